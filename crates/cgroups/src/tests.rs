//! Unit tests against a fake cgroup filesystem in a temporary directory
//! (regular files stand in for cgroup files), covering detection, path
//! derivation and the v2 / v1 file mappings. Real-kernel behaviour is covered
//! by tests/real_cgroups.rs.

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("cgroups-unit-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn put(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).unwrap();
    for (f, v) in files {
        fs::write(dir.join(f), v).unwrap();
    }
}

fn v2_cgroup(dir: &Path, subtree: &str) {
    put(
        dir,
        &[
            ("cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("cgroup.subtree_control", subtree),
            ("cgroup.procs", ""),
        ],
    );
}

#[test]
fn v2_detect_create_and_files() {
    let t = TempDir::new("v2");
    let root = t.0.join("cg");
    v2_cgroup(&root, "");
    v2_cgroup(&root.join("svc"), "");
    v2_cgroup(&root.join("svc/ferrite"), "cpu memory cpuset");
    let vm = root.join("svc/ferrite/vm1");
    v2_cgroup(&vm, "");
    put(
        &vm,
        &[
            ("cpu.max", "max 100000\n"),
            ("cpu.weight", "100\n"),
            ("memory.max", "max\n"),
            ("memory.current", "4096\n"),
            ("cpuset.cpus", ""),
            ("cpuset.cpus.effective", "0\n"),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\nnr_throttled 4\nthrottled_usec 77\n",
            ),
        ],
    );
    let mountinfo = format!(
        "41 31 0:38 / {} rw,relatime - cgroup2 cgroup2 rw\n",
        root.display()
    );
    let m = CgroupManager::detect_from(&mountinfo, "0::/svc\n").unwrap();
    assert_eq!(m.version(), CgroupVersion::V2);
    assert_eq!(m.parent_paths(), vec![root.join("svc/ferrite")]);

    let cg = m.create("vm1").unwrap();
    assert_eq!(cg.paths(), vec![vm.clone()]);
    // Controllers were enabled in the ancestors that lacked them
    // (regular files keep only the last "+x" write).
    assert_eq!(
        fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
        "+cpuset"
    );
    assert_eq!(
        fs::read_to_string(root.join("svc/cgroup.subtree_control")).unwrap(),
        "+cpuset"
    );
    assert_eq!(
        fs::read_to_string(root.join("svc/ferrite/cgroup.subtree_control")).unwrap(),
        "cpu memory cpuset"
    );

    assert_eq!(cg.cpu_quota().unwrap(), None);
    cg.set_cpu_quota(Some((10_000, 100_000))).unwrap();
    assert_eq!(
        fs::read_to_string(vm.join("cpu.max")).unwrap(),
        "10000 100000"
    );
    assert_eq!(cg.cpu_quota().unwrap(), Some((10_000, 100_000)));
    cg.set_cpu_quota(None).unwrap();
    assert_eq!(fs::read_to_string(vm.join("cpu.max")).unwrap(), "max");

    cg.set_cpu_weight(250).unwrap();
    assert_eq!(fs::read_to_string(vm.join("cpu.weight")).unwrap(), "250");
    assert_eq!(cg.cpu_weight().unwrap(), 250);

    cg.set_memory_max(Some(1 << 30)).unwrap();
    assert_eq!(
        fs::read_to_string(vm.join("memory.max")).unwrap(),
        "1073741824"
    );
    assert_eq!(cg.memory_max().unwrap(), Some(1 << 30));
    cg.set_memory_max(None).unwrap();
    assert_eq!(cg.memory_max().unwrap(), None);

    cg.set_cpus(&[0]).unwrap();
    assert_eq!(fs::read_to_string(vm.join("cpuset.cpus")).unwrap(), "0");
    assert_eq!(cg.cpus().unwrap(), vec![0]);
    cg.set_cpus(&[]).unwrap();
    assert_eq!(fs::read_to_string(vm.join("cpuset.cpus")).unwrap(), "\n");

    assert_eq!(
        cg.stats().unwrap(),
        CgroupStats {
            cpu_usage_ns: 1_500_000,
            throttled_ns: 77_000,
            nr_throttled: 4,
            memory_bytes: 4096,
        }
    );

    cg.add_process(1234).unwrap();
    assert_eq!(cg.procs().unwrap(), vec![1234]);
    assert!(matches!(cg.remove(), Err(Error::NotEmpty { ref pids, .. }) if pids == &[1234]));

    assert!(m.open("vm1").is_some());
    assert!(m.open("nope").is_none());
    assert_eq!(m.list().unwrap(), vec!["vm1".to_string()]);

    // Override of the parent.
    let m2 = m.clone().with_parent("/other/vms").unwrap();
    assert_eq!(m2.parent_paths(), vec![root.join("other/vms")]);
    assert!(matches!(
        m.clone().with_parent("rel"),
        Err(Error::InvalidParent(_))
    ));
    assert!(matches!(
        m.clone().with_parent("/a/../b"),
        Err(Error::InvalidParent(_))
    ));
}

#[test]
fn v2_without_controllers_falls_back_to_v1() {
    let t = TempDir::new("hybrid");
    let base = &t.0;
    put(
        &base.join("unified"),
        &[("cgroup.controllers", "hugetlb\n")],
    );
    for h in ["cpu", "cpuacct", "cpuset", "memory"] {
        put(&base.join(h), &[]);
    }
    let mi = format!(
        "32 31 0:29 / {b}/cpu rw - cgroup cgroup rw,cpu\n\
         33 31 0:30 / {b}/cpuacct rw - cgroup cgroup rw,cpuacct\n\
         34 31 0:31 / {b}/cpuset rw - cgroup cgroup rw,cpuset\n\
         35 31 0:32 / {b}/memory rw - cgroup cgroup rw,memory\n\
         41 31 0:38 / {b}/unified rw - cgroup2 cgroup2 rw\n",
        b = base.display()
    );
    let pc = "4:memory:/process_api/0451\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    let m = CgroupManager::detect_from(&mi, pc).unwrap();
    assert_eq!(m.version(), CgroupVersion::V1);
    assert_eq!(
        m.parent_paths(),
        vec![
            base.join("cpuset/ferrite"),
            base.join("cpu/ferrite"),
            base.join("cpuacct/ferrite"),
            base.join("memory/process_api/0451/ferrite"),
        ]
    );

    // v1 file mapping on a pre-populated fake tree.
    put(
        &base.join("cpu/ferrite/vm"),
        &[
            ("cgroup.procs", ""),
            ("cpu.cfs_quota_us", "-1\n"),
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.shares", "1024\n"),
            (
                "cpu.stat",
                "nr_periods 10\nnr_throttled 3\nthrottled_time 5000\n",
            ),
        ],
    );
    put(
        &base.join("cpuacct/ferrite/vm"),
        &[("cgroup.procs", ""), ("cpuacct.usage", "999\n")],
    );
    put(
        &base.join("cpuset"),
        &[("cpuset.cpus", "0-1\n"), ("cpuset.mems", "0\n")],
    );
    put(
        &base.join("cpuset/ferrite"),
        &[("cpuset.cpus", ""), ("cpuset.mems", "")],
    );
    put(
        &base.join("cpuset/ferrite/vm"),
        &[
            ("cgroup.procs", ""),
            ("cpuset.cpus", ""),
            ("cpuset.mems", ""),
        ],
    );
    put(
        &base.join("memory/process_api/0451/ferrite/vm"),
        &[
            ("cgroup.procs", ""),
            ("memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory.usage_in_bytes", "8192\n"),
        ],
    );
    let cg = m.create("vm").unwrap();
    // cpus/mems inherited down the cpuset chain.
    assert_eq!(
        fs::read_to_string(base.join("cpuset/ferrite/cpuset.cpus")).unwrap(),
        "0-1"
    );
    assert_eq!(
        fs::read_to_string(base.join("cpuset/ferrite/vm/cpuset.mems")).unwrap(),
        "0"
    );
    assert_eq!(cg.cpus().unwrap(), vec![0, 1]);

    assert_eq!(cg.cpu_quota().unwrap(), None);
    cg.set_cpu_quota(Some((10_000, 50_000))).unwrap();
    assert_eq!(
        fs::read_to_string(base.join("cpu/ferrite/vm/cpu.cfs_quota_us")).unwrap(),
        "10000"
    );
    assert_eq!(
        fs::read_to_string(base.join("cpu/ferrite/vm/cpu.cfs_period_us")).unwrap(),
        "50000"
    );
    assert_eq!(cg.cpu_quota().unwrap(), Some((10_000, 50_000)));
    cg.set_cpu_quota(None).unwrap();
    assert_eq!(cg.cpu_quota().unwrap(), None);

    cg.set_cpu_weight(50).unwrap();
    assert_eq!(
        fs::read_to_string(base.join("cpu/ferrite/vm/cpu.shares")).unwrap(),
        "512"
    );
    assert_eq!(cg.cpu_weight().unwrap(), 50);

    assert_eq!(cg.memory_max().unwrap(), None);
    cg.set_memory_max(Some(256 << 20)).unwrap();
    assert_eq!(cg.memory_max().unwrap(), Some(256 << 20));
    cg.set_memory_max(None).unwrap();
    assert_eq!(
        fs::read_to_string(base.join("memory/process_api/0451/ferrite/vm/memory.limit_in_bytes"))
            .unwrap(),
        "-1"
    );

    assert_eq!(
        cg.stats().unwrap(),
        CgroupStats {
            cpu_usage_ns: 999,
            throttled_ns: 5000,
            nr_throttled: 3,
            memory_bytes: 8192,
        }
    );
    cg.add_process(42).unwrap();
    assert_eq!(cg.procs().unwrap(), vec![42]);
    assert_eq!(
        fs::read_to_string(base.join("memory/process_api/0451/ferrite/vm/cgroup.procs")).unwrap(),
        "42"
    );
}

#[test]
fn no_hierarchy_is_an_error() {
    let e = CgroupManager::detect_from("", "0::/\n").unwrap_err();
    assert!(matches!(e, Error::NoHierarchy(_)), "{e}");
}

#[test]
fn validation() {
    assert!(validate_name("vm-1_a.b").is_ok());
    for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
        assert!(
            matches!(validate_name(bad), Err(Error::InvalidName(_))),
            "{bad:?}"
        );
    }
    let p = Path::new("/x/cpu.max");
    assert!(check_quota(10_000, 100_000, p).is_ok());
    assert!(check_quota(999, 100_000, p).is_err());
    assert!(check_quota(10_000, 999, p).is_err());
    assert!(check_quota(10_000, 1_000_001, p).is_err());
}

#[test]
fn host_capacity_is_sane() {
    let h = host_capacity().unwrap();
    assert!(h.cpus >= 1);
    assert_eq!(h.cpus as usize, h.cpu_ids.len());
    assert!(h.memory_bytes > 64 << 20);
    let online = online_cpus().unwrap();
    assert!(h.cpu_ids.iter().all(|c| online.contains(c)));
}
