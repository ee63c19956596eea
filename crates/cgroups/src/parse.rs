//! Pure parsing helpers: mountinfo, /proc/PID/cgroup, CPU lists and the
//! cpu.weight <-> cpu.shares mapping. Kept free of I/O so they are unit-testable.

use std::path::{Path, PathBuf};

/// One cgroup filesystem mount found in mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// Mount point, e.g. `/sys/fs/cgroup/cpu`.
    pub mount_point: PathBuf,
    /// Root of the hierarchy that is mounted there (usually `/`).
    pub root: String,
    /// `true` for cgroup2, `false` for cgroup (v1).
    pub v2: bool,
    /// v1 controllers (and `name=` options) bound to this hierarchy; empty for v2.
    pub controllers: Vec<String>,
}

/// Decodes the octal escapes (`\040` etc.) mountinfo uses for special characters.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`, returning every cgroup / cgroup2 mount.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let lf: Vec<&str> = left.split_whitespace().collect();
        let rf: Vec<&str> = right.split_whitespace().collect();
        if lf.len() < 5 || rf.is_empty() {
            continue;
        }
        let v2 = match rf[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            rf.get(2)
                .map(|opts| {
                    opts.split(',')
                        .filter(|o| {
                            !matches!(*o, "rw" | "ro" | "clone_children" | "noprefix" | "xattr")
                                && !o.starts_with("release_agent=")
                        })
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        mounts.push(CgroupMount {
            mount_point: PathBuf::from(unescape(lf[4])),
            root: unescape(lf[3]),
            v2,
            controllers,
        });
    }
    mounts
}

/// Parsed `/proc/PID/cgroup`: the v2 path and the per-controller v1 paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ProcCgroups {
    /// Path in the unified hierarchy (`0::/path`), if listed.
    pub unified: Option<String>,
    /// `(controllers, path)` for each v1 hierarchy line.
    pub v1: Vec<(Vec<String>, String)>,
}

impl ProcCgroups {
    /// The v1 cgroup path of the hierarchy holding `controller`.
    pub fn v1_path(&self, controller: &str) -> Option<&str> {
        self.v1
            .iter()
            .find(|(c, _)| c.iter().any(|x| x == controller))
            .map(|(_, p)| p.as_str())
    }
}

/// Parses `/proc/PID/cgroup` (`hierarchy-id:controller-list:path` lines).
pub(crate) fn parse_proc_cgroup(text: &str) -> ProcCgroups {
    let mut out = ProcCgroups::default();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            out.unified = Some(path.to_string());
        } else {
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            out.v1.push((ctrls, path.to_string()));
        }
    }
    out
}

/// Directory of cgroup `cgroup_path` (as listed in /proc/PID/cgroup) inside
/// the mount `m`, accounting for mounts of a sub-tree (mount root != `/`).
pub(crate) fn cgroup_dir(m: &CgroupMount, cgroup_path: &str) -> PathBuf {
    let root = m.root.trim_end_matches('/');
    let rel = match cgroup_path.strip_prefix(root) {
        Some(rest) if root.is_empty() || rest.is_empty() || rest.starts_with('/') => rest,
        _ => cgroup_path,
    };
    join_rel(&m.mount_point, rel)
}

/// Joins a cgroup path (`/a/b`) below a directory.
pub(crate) fn join_rel(base: &Path, rel: &str) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
    }
    p
}

/// The default per-VM parent for a daemon whose own cgroup is `own`:
/// `<own>/ferrite` (never `//ferrite`).
pub(crate) fn default_parent(own: &str) -> String {
    let own = own.trim_end_matches('/');
    format!("{own}/ferrite")
}

/// Parses a kernel CPU list such as `0-3,8,10-11` (empty input = no CPUs).
pub(crate) fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
            if a > b {
                return None;
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().ok()?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Formats CPUs as a compact kernel CPU list (`0-3,8`).
pub(crate) fn format_cpu_list(cpus: &[u32]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Minimum / default / maximum cgroup v1 `cpu.shares`.
pub const SHARES_MIN: u64 = 2;
/// Default cgroup v1 `cpu.shares` (equivalent to `cpu.weight` 100).
pub const SHARES_DEFAULT: u64 = 1024;
/// Maximum cgroup v1 `cpu.shares`.
pub const SHARES_MAX: u64 = 262_144;

/// Converts a cgroup v2 `cpu.weight` (1..=10000, default 100) to v1
/// `cpu.shares` the way systemd and the kernel do: `weight * 1024 / 100`
/// (rounded), clamped to 2..=262144. 100 maps to 1024.
pub fn weight_to_shares(weight: u32) -> u64 {
    let s = (weight as u64 * SHARES_DEFAULT + 50) / 100;
    s.clamp(SHARES_MIN, SHARES_MAX)
}

/// Inverse of [`weight_to_shares`] (the kernel's `cpu.weight` view of a
/// shares value): `shares * 100 / 1024` rounded, clamped to 1..=10000.
pub fn shares_to_weight(shares: u64) -> u32 {
    let w = (shares.saturating_mul(100) + SHARES_DEFAULT / 2) / SHARES_DEFAULT;
    w.clamp(1, 10_000) as u32
}

/// Parses a `key value` flat-keyed file (cpu.stat, memory.stat) looking up `key`.
pub(crate) fn flat_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Parses `MemTotal:  16318404 kB` from /proc/meminfo into bytes.
pub(crate) fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:39 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct
43 31 0:40 /docker/abc /mnt/my\\040cg rw - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 7);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(m[0].controllers, vec!["cpu"]);
        assert!(!m[0].v2);
        assert_eq!(m[3].controllers, vec!["name=systemd"]);
        assert!(m[4].v2);
        assert_eq!(m[5].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(m[6].mount_point, PathBuf::from("/mnt/my cg"));
        assert_eq!(m[6].root, "/docker/abc");
    }

    #[test]
    fn proc_cgroup() {
        let p = parse_proc_cgroup(
            "9:name=systemd:/\n4:memory:/process_api/04510037\n2:cpu,cpuacct:/x\n0::/system.slice/ferrited.service\n",
        );
        assert_eq!(p.unified.as_deref(), Some("/system.slice/ferrited.service"));
        assert_eq!(p.v1_path("memory"), Some("/process_api/04510037"));
        assert_eq!(p.v1_path("cpuacct"), Some("/x"));
        assert_eq!(p.v1_path("cpu"), Some("/x"));
        assert_eq!(p.v1_path("cpuset"), None);
    }

    #[test]
    fn path_derivation() {
        let m = CgroupMount {
            mount_point: "/sys/fs/cgroup/memory".into(),
            root: "/".into(),
            v2: false,
            controllers: vec!["memory".into()],
        };
        let parent = default_parent("/process_api/0451");
        assert_eq!(parent, "/process_api/0451/ferrite");
        assert_eq!(
            join_rel(&cgroup_dir(&m, &parent), "vm1"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/0451/ferrite/vm1")
        );
        // Root cgroup: no double slash.
        assert_eq!(default_parent("/"), "/ferrite");
        assert_eq!(
            cgroup_dir(&m, "/ferrite"),
            PathBuf::from("/sys/fs/cgroup/memory/ferrite")
        );
        // A container's sub-tree mount strips the mount root.
        let sub = CgroupMount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/docker/abc".into(),
            v2: true,
            controllers: vec![],
        };
        assert_eq!(
            cgroup_dir(&sub, "/docker/abc/ferrite"),
            PathBuf::from("/sys/fs/cgroup/ferrite")
        );
        assert_eq!(
            cgroup_dir(&sub, "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup")
        );
        // Not below the mount root (cgroup namespace): used as is.
        assert_eq!(
            cgroup_dir(&sub, "/docker/abcd/x"),
            PathBuf::from("/sys/fs/cgroup/docker/abcd/x")
        );
        assert_eq!(
            default_parent("/system.slice/ferrited.service"),
            "/system.slice/ferrited.service/ferrite"
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[11, 0, 1, 2, 3, 8, 10, 3]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn weight_shares_mapping() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(50), 512);
        assert_eq!(weight_to_shares(200), 2048);
        assert_eq!(weight_to_shares(10_000), 102_400);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Every valid weight survives a round trip through shares.
        for w in 1..=10_000 {
            let s = weight_to_shares(w);
            assert!((SHARES_MIN..=SHARES_MAX).contains(&s));
            assert_eq!(shares_to_weight(s), w, "weight {w} -> shares {s}");
        }
        // Monotonic.
        for w in 1..10_000 {
            assert!(weight_to_shares(w) < weight_to_shares(w + 1));
        }
    }

    #[test]
    fn flat_keys_and_meminfo() {
        let s = "usage_usec 123\nuser_usec 100\nnr_throttled 7\nthrottled_usec 55\n";
        assert_eq!(flat_key(s, "usage_usec"), Some(123));
        assert_eq!(flat_key(s, "throttled_usec"), Some(55));
        assert_eq!(flat_key(s, "nr_periods"), None);
        assert_eq!(
            mem_total("MemTotal:       16318404 kB\nMemFree: 1 kB\n"),
            Some(16318404 * 1024)
        );
    }
}
