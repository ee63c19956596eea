//! Per-VM cgroups for the `ferrited` daemon.
//!
//! Every VM's VMM process is placed in its own cgroup so the daemon can cap
//! its CPU time (`cpu.max`), set its relative priority (`cpu.weight`), limit
//! its memory (`memory.max`) and optionally pin it to host CPUs (`cpuset`),
//! and change all of those while the VM runs.
//!
//! Two backends sit behind one API, chosen at run time by
//! [`CgroupManager::detect`] from `/proc/self/mountinfo` and
//! `/proc/self/cgroup`:
//!
//! * **cgroup v2** (preferred): used when a cgroup2 hierarchy is mounted and
//!   the `cpu` and `memory` controllers are available in the daemon's own
//!   cgroup (`cgroup.controllers`).
//! * **cgroup v1** (fallback): `cpu`, `cpuacct`, `cpuset` and `memory`
//!   hierarchies. v2 semantics are mapped: `cpu.max` →
//!   `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `cpu.weight` → `cpu.shares`
//!   ([`weight_to_shares`]), `memory.max` → `memory.limit_in_bytes`,
//!   `cpuset.cpus` → `cpuset.cpus` (+ `cpuset.mems` copied from the parent).
//!
//! # Placement and delegation
//!
//! VM cgroups live at `<daemon's own cgroup>/ferrite/<vm-name>` in every
//! hierarchy used (so VMs stay inside whatever limits the daemon's supervisor
//! imposed), or below the parent given to [`CgroupManager::with_parent`].
//!
//! On cgroup v2 the *no internal processes* rule applies: a non-root cgroup
//! that holds processes cannot enable controllers for its children. When the
//! daemon runs as a systemd service it should therefore use `Delegate=yes`
//! (systemd then hands the service's sub-tree to the daemon with controllers
//! available), and the daemon's own process must not sit in the cgroup whose
//! `cgroup.subtree_control` needs changing — e.g. move the daemon into a leaf
//! such as `<service>/daemon` and pass `<service>/vms` to
//! [`CgroupManager::with_parent`], or run it from the root cgroup.
//! [`CgroupManager::create`] enables `cpu`, `memory` (required) and `cpuset`
//! (when available) in every ancestor's `cgroup.subtree_control` from the
//! hierarchy root down to the VM's parent, skipping ones already enabled.

mod parse;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use parse::{shares_to_weight, weight_to_shares, SHARES_DEFAULT, SHARES_MAX, SHARES_MIN};
use parse::{CgroupMount, ProcCgroups};

/// Errors from cgroup operations. Messages name the cgroup file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a cgroup or proc file failed.
    #[error("Cannot read {path}: {source}")]
    Read {
        /// File that could not be read.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Writing a cgroup file failed.
    #[error("Cannot write {value:?} to {path}: {source}")]
    Write {
        /// File that could not be written.
        path: PathBuf,
        /// Value that was written.
        value: String,
        /// Underlying error.
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("Cannot create cgroup {path}: {source}")]
    CreateDir {
        /// Directory that could not be created.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Removing a cgroup directory failed.
    #[error("Cannot remove cgroup {path}: {source}")]
    RemoveDir {
        /// Directory that could not be removed.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A cgroup file held unexpected contents.
    #[error("Cannot parse {path}: unexpected contents {content:?}")]
    Parse {
        /// File with unexpected contents.
        path: PathBuf,
        /// What it contained.
        content: String,
    },
    /// Neither a usable cgroup v2 nor v1 hierarchy was found.
    #[error("No usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    /// A controller needed for an operation is not available.
    #[error("Controller {controller} is not available in {path}")]
    ControllerUnavailable {
        /// Controller name (`cpu`, `memory`, `cpuset`, ...).
        controller: &'static str,
        /// cgroup directory or file checked.
        path: PathBuf,
    },
    /// Enabling a controller in an ancestor's `cgroup.subtree_control` failed.
    #[error(
        "Cannot enable {controller} in {path}: {source} (a non-root cgroup holding processes \
         cannot delegate controllers; run ferrited with Delegate=yes from a leaf cgroup \
         or choose another parent)"
    )]
    Delegate {
        /// Controller name.
        controller: &'static str,
        /// The `cgroup.subtree_control` file.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The VM name cannot be used as a cgroup directory name.
    #[error("Invalid VM cgroup name {0:?}: use 1-128 characters from [A-Za-z0-9_.-], not starting with '.'")]
    InvalidName(String),
    /// The parent override is not an absolute cgroup path.
    #[error("Invalid cgroup parent {0:?}: must be an absolute cgroup path without '..'")]
    InvalidParent(String),
    /// CPU weight outside 1..=10000.
    #[error("Invalid CPU weight {weight} for {path}: must be 1..=10000")]
    InvalidWeight {
        /// Rejected weight.
        weight: u32,
        /// File it was meant for.
        path: PathBuf,
    },
    /// CPU quota or period outside the kernel's limits.
    #[error(
        "Invalid CPU quota {quota_us}us per {period_us}us for {path}: \
         period must be 1000..=1000000 us and quota at least 1000 us"
    )]
    InvalidQuota {
        /// Rejected quota.
        quota_us: u64,
        /// Rejected period.
        period_us: u64,
        /// File it was meant for.
        path: PathBuf,
    },
    /// A CPU to pin to is not online on the host.
    #[error("Invalid CPU {cpu} for {path}: not an online host CPU (online: {online})")]
    InvalidCpu {
        /// Rejected CPU number.
        cpu: u32,
        /// The host's online CPU list.
        online: String,
        /// File it was meant for.
        path: PathBuf,
    },
    /// The cgroup still holds processes and cannot be removed.
    #[error("Cannot remove cgroup {path}: processes still attached {pids:?}")]
    NotEmpty {
        /// cgroup directory.
        path: PathBuf,
        /// Processes still in it.
        pids: Vec<u32>,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which cgroup interface is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// Unified hierarchy.
    V2,
}

/// Resource usage of a VM cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Total CPU time consumed, in nanoseconds (v2 `cpu.stat` usage_usec,
    /// v1 `cpuacct.usage`; 0 on v1 without a cpuacct hierarchy).
    pub cpu_usage_ns: u64,
    /// Total time throttled by the CPU quota, in nanoseconds.
    pub throttled_ns: u64,
    /// Number of periods in which the group was throttled.
    pub nr_throttled: u64,
    /// Current memory usage in bytes (`memory.current` / `memory.usage_in_bytes`).
    pub memory_bytes: u64,
}

/// CPU and memory resources of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    /// Number of CPUs usable by this process (online and in its affinity mask).
    pub cpus: u32,
    /// Those CPUs' numbers.
    pub cpu_ids: Vec<u32>,
    /// Physical memory (`MemTotal` from /proc/meminfo), in bytes.
    pub memory_bytes: u64,
}

/// The host's online CPUs (`/sys/devices/system/cpu/online`, falling back to
/// this process's affinity mask).
pub fn online_cpus() -> Result<Vec<u32>> {
    let path = Path::new("/sys/devices/system/cpu/online");
    match fs::read_to_string(path) {
        Ok(s) => parse::parse_cpu_list(&s).ok_or_else(|| Error::Parse {
            path: path.into(),
            content: s,
        }),
        Err(_) => affinity_cpus(),
    }
}

fn affinity_cpus() -> Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(Error::Read {
                path: "sched_getaffinity".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok((0..libc::CPU_SETSIZE as u32)
            .filter(|&c| libc::CPU_ISSET(c as usize, &set))
            .collect())
    }
}

/// CPUs and memory available on the host to this process.
pub fn host_capacity() -> Result<HostCapacity> {
    let affinity = affinity_cpus()?;
    let online = online_cpus().unwrap_or_else(|_| affinity.clone());
    let cpu_ids: Vec<u32> = affinity
        .into_iter()
        .filter(|c| online.contains(c))
        .collect();
    let meminfo = read("/proc/meminfo")?;
    let memory_bytes = parse::mem_total(&meminfo).ok_or_else(|| Error::Parse {
        path: "/proc/meminfo".into(),
        content: meminfo.lines().next().unwrap_or_default().to_string(),
    })?;
    Ok(HostCapacity {
        cpus: cpu_ids.len() as u32,
        cpu_ids,
        memory_bytes,
    })
}

fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64> {
    let s = read(path)?;
    s.trim().parse().map_err(|_| Error::Parse {
        path: path.into(),
        content: s,
    })
}

/// Writes `value` in a single write(2) without creating the file.
fn write_raw(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    // An empty write would be a no-op; cgroup files accept a bare newline.
    let data = if value.is_empty() { "\n" } else { value };
    f.write_all(data.as_bytes())
}

fn write(path: &Path, value: &str) -> Result<()> {
    write_raw(path, value).map_err(|source| Error::Write {
        path: path.into(),
        value: value.into(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::CreateDir {
            path: path.into(),
            source,
        }),
    }
}

fn controllers_of(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.into()))
    }
}

/// One mounted hierarchy plus the daemon's own cgroup path in it.
#[derive(Debug, Clone)]
struct Hier {
    mount: CgroupMount,
    own: String,
}

/// Per-controller directories; on v2 all point at the same directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dirs {
    cpu: PathBuf,
    cpuacct: Option<PathBuf>,
    cpuset: Option<PathBuf>,
    memory: PathBuf,
}

impl Dirs {
    fn join(&self, name: &str) -> Dirs {
        Dirs {
            cpu: self.cpu.join(name),
            cpuacct: self.cpuacct.as_ref().map(|p| p.join(name)),
            cpuset: self.cpuset.as_ref().map(|p| p.join(name)),
            memory: self.memory.join(name),
        }
    }

    /// Distinct directories, cpuset first (v1 needs it configured before use).
    fn unique(&self) -> Vec<&PathBuf> {
        let mut v: Vec<&PathBuf> = Vec::new();
        for p in [
            self.cpuset.as_ref(),
            Some(&self.cpu),
            self.cpuacct.as_ref(),
            Some(&self.memory),
        ]
        .into_iter()
        .flatten()
        {
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v
    }
}

/// Finds the cgroups to use and creates / opens per-VM cgroups.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    version: CgroupVersion,
    cpu: Hier,
    cpuacct: Option<Hier>,
    cpuset: Option<Hier>,
    memory: Hier,
    parent: Option<String>,
}

impl CgroupManager {
    /// Detects the cgroup layout of this host from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`: cgroup v2 when its `cpu` and `memory` controllers
    /// are available to the daemon's cgroup, otherwise cgroup v1.
    pub fn detect() -> Result<Self> {
        Self::detect_from(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
    }

    fn detect_from(mountinfo: &str, proc_cgroup: &str) -> Result<Self> {
        let mounts = parse::parse_mountinfo(mountinfo);
        let own: ProcCgroups = parse::parse_proc_cgroup(proc_cgroup);

        let mut v2_note = "no cgroup2 mount".to_string();
        if let (Some(m), Some(path)) = (mounts.iter().find(|m| m.v2), own.unified.as_ref()) {
            let dir = parse::cgroup_dir(m, path);
            let ctrls = controllers_of(&dir);
            let has = |c: &str| ctrls.iter().any(|x| x == c);
            if has("cpu") && has("memory") {
                let h = Hier {
                    mount: m.clone(),
                    own: path.clone(),
                };
                return Ok(CgroupManager {
                    version: CgroupVersion::V2,
                    cpu: h.clone(),
                    cpuacct: None,
                    cpuset: has("cpuset").then(|| h.clone()),
                    memory: h,
                    parent: None,
                });
            }
            v2_note = format!(
                "cgroup2 at {} offers controllers [{}], not cpu+memory",
                dir.display(),
                ctrls.join(" ")
            );
        }

        let v1 = |ctrl: &str| -> Option<Hier> {
            let m = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))?;
            Some(Hier {
                mount: m.clone(),
                own: own.v1_path(ctrl)?.to_string(),
            })
        };
        match (v1("cpu"), v1("memory")) {
            (Some(cpu), Some(memory)) => Ok(CgroupManager {
                version: CgroupVersion::V1,
                cpu,
                cpuacct: v1("cpuacct"),
                cpuset: v1("cpuset"),
                memory,
                parent: None,
            }),
            _ => Err(Error::NoHierarchy(format!(
                "{v2_note}, and no cgroup v1 cpu and memory hierarchies"
            ))),
        }
    }

    /// Places VM cgroups under `parent` instead of `<own cgroup>/ferrite`.
    /// `parent` is a cgroup path as in `/proc/self/cgroup` (e.g.
    /// `/system.slice/ferrited.service/vms`), used in every hierarchy.
    pub fn with_parent(mut self, parent: &str) -> Result<Self> {
        if !parent.starts_with('/') || parent.split('/').any(|c| c == "..") {
            return Err(Error::InvalidParent(parent.into()));
        }
        self.parent = Some(parent.into());
        Ok(self)
    }

    /// The backend in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn parent_dir(&self, h: &Hier) -> PathBuf {
        let p = self
            .parent
            .clone()
            .unwrap_or_else(|| parse::default_parent(&h.own));
        parse::cgroup_dir(&h.mount, &p)
    }

    fn parent_dirs(&self) -> Dirs {
        Dirs {
            cpu: self.parent_dir(&self.cpu),
            cpuacct: self.cpuacct.as_ref().map(|h| self.parent_dir(h)),
            cpuset: self.cpuset.as_ref().map(|h| self.parent_dir(h)),
            memory: self.parent_dir(&self.memory),
        }
    }

    /// Directories (one per hierarchy in use) under which VM cgroups are created.
    pub fn parent_paths(&self) -> Vec<PathBuf> {
        self.parent_dirs().unique().into_iter().cloned().collect()
    }

    /// Creates the cgroup for `vm_name`, or reuses it if it already exists
    /// (e.g. when re-adopting running VMs after a daemon restart). Existing
    /// limits and member processes are left untouched.
    pub fn create(&self, vm_name: &str) -> Result<VmCgroup> {
        validate_name(vm_name)?;
        let parents = self.parent_dirs();
        let dirs = parents.join(vm_name);
        match self.version {
            CgroupVersion::V2 => {
                let mount = &self.cpu.mount.mount_point;
                let chain = chain(mount, &parents.cpu);
                for (i, dir) in chain.iter().enumerate() {
                    if i > 0 {
                        mkdir(dir)?;
                    }
                    enable_controllers(dir)?;
                }
                mkdir(&dirs.cpu)?;
                let ctrls = controllers_of(&dirs.cpu);
                for c in ["cpu", "memory"] {
                    if !ctrls.iter().any(|x| x == c) {
                        return Err(Error::ControllerUnavailable {
                            controller: c,
                            path: dirs.cpu.join("cgroup.controllers"),
                        });
                    }
                }
            }
            CgroupVersion::V1 => {
                for (h, dir) in [
                    (Some(&self.cpu), Some(&dirs.cpu)),
                    (self.cpuacct.as_ref(), dirs.cpuacct.as_ref()),
                    (self.cpuset.as_ref(), dirs.cpuset.as_ref()),
                    (Some(&self.memory), Some(&dirs.memory)),
                ] {
                    let (Some(h), Some(dir)) = (h, dir) else {
                        continue;
                    };
                    let is_cpuset = h.mount.controllers.iter().any(|c| c == "cpuset");
                    for (i, d) in chain(&h.mount.mount_point, dir).iter().enumerate() {
                        if i > 0 {
                            mkdir(d)?;
                            if is_cpuset {
                                inherit_cpuset(d)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(VmCgroup {
            name: vm_name.into(),
            version: self.version,
            dirs,
        })
    }

    /// Opens the existing cgroup of `vm_name`; `None` if it does not exist
    /// (in every hierarchy used) or the name is invalid.
    pub fn open(&self, vm_name: &str) -> Option<VmCgroup> {
        validate_name(vm_name).ok()?;
        let dirs = self.parent_dirs().join(vm_name);
        dirs.unique().iter().all(|d| d.is_dir()).then(|| VmCgroup {
            name: vm_name.into(),
            version: self.version,
            dirs,
        })
    }

    /// Names of the existing VM cgroups under the parent, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let parent = self.parent_dirs().cpu;
        let entries = match fs::read_dir(&parent) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Read {
                    path: parent,
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| self.open(n).is_some())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// `root`, then each directory from `root` down to `dir` (inclusive).
fn chain(root: &Path, dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if let Ok(rel) = dir.strip_prefix(root) {
        let mut cur = root.to_path_buf();
        for c in rel.components() {
            cur.push(c);
            out.push(cur.clone());
        }
    }
    out
}

/// v2: enables cpu and memory (required) and cpuset (if offered) for the
/// children of `dir`, skipping controllers already enabled.
fn enable_controllers(dir: &Path) -> Result<()> {
    let offered = controllers_of(dir);
    let path = dir.join("cgroup.subtree_control");
    let enabled = read(&path)?;
    for (c, required) in [("cpu", true), ("memory", true), ("cpuset", false)] {
        if enabled.split_whitespace().any(|x| x == c) {
            continue;
        }
        if !offered.iter().any(|x| x == c) {
            if required {
                return Err(Error::ControllerUnavailable {
                    controller: c,
                    path: dir.join("cgroup.controllers"),
                });
            }
            continue;
        }
        match write_raw(&path, &format!("+{c}")) {
            Ok(()) => {}
            Err(source) if required => {
                return Err(Error::Delegate {
                    controller: c,
                    path,
                    source,
                })
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// v1: a new cpuset cgroup starts with empty cpus/mems and cannot take
/// tasks; copy them from the parent when empty.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for f in ["cpuset.mems", "cpuset.cpus"] {
        if read(dir.join(f))?.trim().is_empty() {
            write(&dir.join(f), read(parent.join(f))?.trim())?;
        }
    }
    Ok(())
}

/// The cgroup(s) of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    name: String,
    version: CgroupVersion,
    dirs: Dirs,
}

impl VmCgroup {
    /// The VM name this cgroup belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The cgroup directories (one on v2, one per hierarchy on v1).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.unique().into_iter().cloned().collect()
    }

    /// Moves process `pid` with all its threads into this cgroup
    /// (`cgroup.procs` in every hierarchy).
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for d in self.dirs.unique() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes currently in the cgroup (union over hierarchies), sorted.
    pub fn procs(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        for d in self.dirs.unique() {
            let path = d.join("cgroup.procs");
            let s = read(&path)?;
            for l in s.lines().filter(|l| !l.trim().is_empty()) {
                pids.push(l.trim().parse().map_err(|_| Error::Parse {
                    path: path.clone(),
                    content: l.into(),
                })?);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Sets the CPU bandwidth limit: `Some((quota_us, period_us))` allows
    /// `quota_us` of CPU time per `period_us` (e.g. `(50_000, 100_000)` =
    /// half a CPU, `(200_000, 100_000)` = two CPUs); `None` removes the limit.
    /// Takes effect immediately on running processes.
    pub fn set_cpu_quota(&self, quota: Option<(u64, u64)>) -> Result<()> {
        let dir = &self.dirs.cpu;
        match self.version {
            CgroupVersion::V2 => {
                let path = dir.join("cpu.max");
                let value = match quota {
                    None => "max".to_string(),
                    Some((q, p)) => {
                        check_quota(q, p, &path)?;
                        format!("{q} {p}")
                    }
                };
                write(&path, &value)
            }
            CgroupVersion::V1 => {
                let qpath = dir.join("cpu.cfs_quota_us");
                match quota {
                    None => write(&qpath, "-1"),
                    Some((q, p)) => {
                        check_quota(q, p, &qpath)?;
                        // Lift the quota first so any period is accepted.
                        write(&qpath, "-1")?;
                        write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
                        write(&qpath, &q.to_string())
                    }
                }
            }
        }
    }

    /// Current CPU bandwidth limit as `(quota_us, period_us)`; `None` = unlimited.
    pub fn cpu_quota(&self) -> Result<Option<(u64, u64)>> {
        let dir = &self.dirs.cpu;
        match self.version {
            CgroupVersion::V2 => {
                let path = dir.join("cpu.max");
                let s = read(&path)?;
                let bad = || Error::Parse {
                    path: path.clone(),
                    content: s.clone(),
                };
                let mut it = s.split_whitespace();
                let (q, p) = (it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?);
                if q == "max" {
                    return Ok(None);
                }
                Ok(Some((
                    q.parse().map_err(|_| bad())?,
                    p.parse().map_err(|_| bad())?,
                )))
            }
            CgroupVersion::V1 => {
                let qpath = dir.join("cpu.cfs_quota_us");
                let s = read(&qpath)?;
                let q: i64 = s.trim().parse().map_err(|_| Error::Parse {
                    path: qpath.clone(),
                    content: s.clone(),
                })?;
                if q < 0 {
                    return Ok(None);
                }
                Ok(Some((q as u64, read_u64(&dir.join("cpu.cfs_period_us"))?)))
            }
        }
    }

    fn weight_path(&self) -> PathBuf {
        self.dirs.cpu.join(match self.version {
            CgroupVersion::V2 => "cpu.weight",
            CgroupVersion::V1 => "cpu.shares",
        })
    }

    /// Sets the relative CPU priority, 1..=10000 (default 100). On v1 it is
    /// written as `cpu.shares` via [`weight_to_shares`].
    pub fn set_cpu_weight(&self, weight: u32) -> Result<()> {
        let path = self.weight_path();
        if !(1..=10_000).contains(&weight) {
            return Err(Error::InvalidWeight { weight, path });
        }
        let value = match self.version {
            CgroupVersion::V2 => weight as u64,
            CgroupVersion::V1 => weight_to_shares(weight),
        };
        write(&path, &value.to_string())
    }

    /// Current CPU weight (on v1 derived from `cpu.shares`).
    pub fn cpu_weight(&self) -> Result<u32> {
        let v = read_u64(&self.weight_path())?;
        Ok(match self.version {
            CgroupVersion::V2 => v as u32,
            CgroupVersion::V1 => shares_to_weight(v),
        })
    }

    fn memory_path(&self) -> PathBuf {
        self.dirs.memory.join(match self.version {
            CgroupVersion::V2 => "memory.max",
            CgroupVersion::V1 => "memory.limit_in_bytes",
        })
    }

    /// Sets the memory limit in bytes (`None` = unlimited). The kernel rounds
    /// down to a page multiple; lowering it below current usage makes the
    /// kernel reclaim (v1 fails with EBUSY if it cannot).
    pub fn set_memory_max(&self, bytes: Option<u64>) -> Result<()> {
        let value = match (bytes, self.version) {
            (Some(b), _) => b.to_string(),
            (None, CgroupVersion::V2) => "max".into(),
            (None, CgroupVersion::V1) => "-1".into(),
        };
        write(&self.memory_path(), &value)
    }

    /// Current memory limit in bytes; `None` = unlimited.
    pub fn memory_max(&self) -> Result<Option<u64>> {
        let path = self.memory_path();
        let s = read(&path)?;
        if s.trim() == "max" {
            return Ok(None);
        }
        let v: u64 = s.trim().parse().map_err(|_| Error::Parse {
            path,
            content: s.clone(),
        })?;
        // v1 reports "unlimited" as PAGE_COUNTER_MAX * PAGE_SIZE.
        Ok((v < 0x7FFF_FFFF_FFFF_F000).then_some(v))
    }

    fn cpuset_dir(&self) -> Result<&PathBuf> {
        let unavailable = || Error::ControllerUnavailable {
            controller: "cpuset",
            path: self.dirs.cpu.join("cpuset.cpus"),
        };
        let dir = self.dirs.cpuset.as_ref().ok_or_else(unavailable)?;
        if dir.join("cpuset.cpus").exists() {
            Ok(dir)
        } else {
            Err(unavailable())
        }
    }

    /// Pins the cgroup's processes to the given host CPUs. Every CPU must be
    /// online. An empty slice removes the pinning (all of the parent's CPUs).
    pub fn set_cpus(&self, cpus: &[u32]) -> Result<()> {
        let dir = self.cpuset_dir()?;
        let path = dir.join("cpuset.cpus");
        let online = online_cpus()?;
        if let Some(&cpu) = cpus.iter().find(|c| !online.contains(c)) {
            return Err(Error::InvalidCpu {
                cpu,
                online: parse::format_cpu_list(&online),
                path,
            });
        }
        let value = if cpus.is_empty() && self.version == CgroupVersion::V1 {
            let parent = dir.parent().unwrap_or(dir).join("cpuset.cpus");
            read(parent)?.trim().to_string()
        } else {
            parse::format_cpu_list(cpus)
        };
        write(&path, &value)
    }

    /// CPUs the cgroup's processes may run on (v2: `cpuset.cpus.effective`).
    pub fn cpus(&self) -> Result<Vec<u32>> {
        let dir = self.cpuset_dir()?;
        let path = match self.version {
            CgroupVersion::V2 => dir.join("cpuset.cpus.effective"),
            CgroupVersion::V1 => dir.join("cpuset.cpus"),
        };
        let s = read(&path)?;
        parse::parse_cpu_list(&s).ok_or(Error::Parse { path, content: s })
    }

    /// CPU and memory usage counters.
    pub fn stats(&self) -> Result<CgroupStats> {
        let cpu_stat_path = self.dirs.cpu.join("cpu.stat");
        let cpu_stat = read(&cpu_stat_path)?;
        let key = |k: &str| parse::flat_key(&cpu_stat, k).unwrap_or(0);
        match self.version {
            CgroupVersion::V2 => Ok(CgroupStats {
                cpu_usage_ns: key("usage_usec") * 1000,
                throttled_ns: key("throttled_usec") * 1000,
                nr_throttled: key("nr_throttled"),
                memory_bytes: read_u64(&self.dirs.memory.join("memory.current"))?,
            }),
            CgroupVersion::V1 => Ok(CgroupStats {
                cpu_usage_ns: match &self.dirs.cpuacct {
                    Some(d) => read_u64(&d.join("cpuacct.usage"))?,
                    None => 0,
                },
                throttled_ns: key("throttled_time"),
                nr_throttled: key("nr_throttled"),
                memory_bytes: read_u64(&self.dirs.memory.join("memory.usage_in_bytes"))?,
            }),
        }
    }

    /// Removes the cgroup. Kills nothing: fails with [`Error::NotEmpty`] if
    /// processes remain. Removing an already removed cgroup succeeds.
    pub fn remove(&self) -> Result<()> {
        let pids = match self.procs() {
            Ok(p) => p,
            Err(Error::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        if !pids.is_empty() {
            return Err(Error::NotEmpty {
                path: self.dirs.cpu.clone(),
                pids,
            });
        }
        for d in self.dirs.unique() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::NotEmpty {
                        path: d.clone(),
                        pids: self.procs().unwrap_or_default(),
                    })
                }
                Err(source) => {
                    return Err(Error::RemoveDir {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Like [`remove`](Self::remove), but retries for up to `timeout` while
    /// processes are still leaving (e.g. a just-killed VMM still exiting).
    pub fn remove_when_empty(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.remove() {
                Err(Error::NotEmpty { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }
}

fn check_quota(quota_us: u64, period_us: u64, path: &Path) -> Result<()> {
    if (1000..=1_000_000).contains(&period_us) && quota_us >= 1000 {
        Ok(())
    } else {
        Err(Error::InvalidQuota {
            quota_us,
            period_us,
            path: path.into(),
        })
    }
}

#[cfg(test)]
mod tests;
