//! Tests against the host's real cgroups (v2 or the v1 fallback, whichever
//! `CgroupManager::detect` picks). They need root and fail loudly when no
//! cgroup can be created. Every cgroup created is removed by a drop guard.

use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use cgroups::{CgroupManager, Error, VmCgroup};

fn manager() -> CgroupManager {
    CgroupManager::detect().expect("cgroup detection failed; these tests need cgroups and root")
}

fn name(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// Kills the child (if any) and removes the cgroup, even when a test panics.
struct Guard {
    cg: VmCgroup,
    child: Option<Child>,
}

impl Guard {
    fn new(m: &CgroupManager, tag: &str) -> Self {
        let cg = m
            .create(&name(tag))
            .unwrap_or_else(|e| panic!("cannot create a test cgroup: {e}"));
        Guard { cg, child: None }
    }

    fn spawn_busy(&mut self) -> u32 {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawn busy loop");
        let pid = child.id();
        self.child = Some(child);
        self.cg.add_process(pid).expect("add_process");
        pid
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
        if let Err(e) = self.cg.remove_when_empty(Duration::from_secs(5)) {
            eprintln!("cleanup of {:?} failed: {e}", self.cg.paths());
        }
    }
}

fn usage_ns(cg: &VmCgroup) -> u64 {
    cg.stats().expect("stats").cpu_usage_ns
}

#[test]
fn create_reopen_remove() {
    let m = manager();
    let g = Guard::new(&m, "basic");
    let n = g.cg.name().to_string();
    for p in g.cg.paths() {
        assert!(p.is_dir(), "{p:?}");
        assert!(p.ends_with(format!("ferrite/{n}")), "{p:?}");
    }
    // Idempotent create and open both yield the same cgroup.
    assert_eq!(m.create(&n).unwrap(), g.cg);
    assert_eq!(m.open(&n), Some(g.cg.clone()));
    assert!(m.list().unwrap().contains(&n));
    assert!(g.cg.procs().unwrap().is_empty());

    g.cg.remove().unwrap();
    assert!(m.open(&n).is_none());
    for p in g.cg.paths() {
        assert!(!p.exists(), "{p:?}");
    }
    // Removing again is fine (the guard does it too).
    g.cg.remove().unwrap();
    assert!(matches!(m.create("bad/name"), Err(Error::InvalidName(_))));
    assert!(m.open("../x").is_none());
}

#[test]
fn quota_throttles_and_can_be_lifted_live() {
    let m = manager();
    let mut g = Guard::new(&m, "quota");
    g.cg.set_cpu_quota(Some((10_000, 100_000))).unwrap();
    assert_eq!(g.cg.cpu_quota().unwrap(), Some((10_000, 100_000)));
    let pid = g.spawn_busy();
    assert_eq!(g.cg.procs().unwrap(), vec![pid]);

    sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let u0 = usage_ns(&g.cg);
    sleep(Duration::from_secs(1));
    let limited = usage_ns(&g.cg) - u0;
    let wall = t0.elapsed().as_nanos() as u64;
    let s = g.cg.stats().unwrap();
    eprintln!("limited: {limited} ns CPU in {wall} ns wall, {s:?}");
    assert!(s.nr_throttled > 0, "{s:?}");
    assert!(s.throttled_ns > 0, "{s:?}");
    assert!(
        limited < wall / 2,
        "used {limited} ns of CPU in {wall} ns under a 10% quota"
    );
    // memory_bytes may be 0 here: on v1 pages charged before the move stay
    // with the old cgroup (memory.move_charge_at_immigrate is off).

    // Lift the quota while it runs: it must get well beyond 10% now.
    g.cg.set_cpu_quota(None).unwrap();
    assert_eq!(g.cg.cpu_quota().unwrap(), None);
    let u1 = usage_ns(&g.cg);
    let t1 = Instant::now();
    loop {
        sleep(Duration::from_millis(100));
        let used = usage_ns(&g.cg) - u1;
        if used > 300_000_000 {
            eprintln!("unlimited: {used} ns CPU in {:?}", t1.elapsed());
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(3),
            "only {used} ns of CPU in {:?} after lifting the quota",
            t1.elapsed()
        );
    }

    // Still populated: removal must refuse and kill nothing.
    match g.cg.remove() {
        Err(e @ Error::NotEmpty { .. }) => assert!(e.to_string().contains(&pid.to_string()), "{e}"),
        r => panic!("remove of a populated cgroup gave {r:?}"),
    }
    assert_eq!(g.cg.procs().unwrap(), vec![pid]);

    g.kill();
    g.cg.remove_when_empty(Duration::from_secs(5)).unwrap();
    assert!(m.open(g.cg.name()).is_none());
}

#[test]
fn weight_memory_and_pinning() {
    let m = manager();
    let mut g = Guard::new(&m, "knobs");
    g.cg.set_cpu_weight(300).unwrap();
    assert_eq!(g.cg.cpu_weight().unwrap(), 300);
    g.cg.set_cpu_weight(100).unwrap();
    assert_eq!(g.cg.cpu_weight().unwrap(), 100);

    g.cg.set_memory_max(Some(256 << 20)).unwrap();
    assert_eq!(g.cg.memory_max().unwrap(), Some(256 << 20));
    g.cg.set_memory_max(None).unwrap();
    assert_eq!(g.cg.memory_max().unwrap(), None);

    let pid = g.spawn_busy();
    g.cg.set_cpus(&[0]).unwrap();
    assert_eq!(g.cg.cpus().unwrap(), vec![0]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(allowed, "0");

    // Unpinning restores all the parent's CPUs.
    g.cg.set_cpus(&[]).unwrap();
    let all = g.cg.cpus().unwrap();
    assert_eq!(all, cgroups::online_cpus().unwrap());

    // Bad values give clear errors and change nothing.
    let e = g.cg.set_cpu_weight(0).unwrap_err();
    assert!(matches!(e, Error::InvalidWeight { weight: 0, .. }), "{e}");
    assert!(
        e.to_string().contains("cpu.weight") || e.to_string().contains("cpu.shares"),
        "{e}"
    );
    assert!(g.cg.set_cpu_weight(10_001).is_err());
    let e = g.cg.set_cpus(&[0, 999]).unwrap_err();
    assert!(matches!(e, Error::InvalidCpu { cpu: 999, .. }), "{e}");
    assert!(e.to_string().contains("CPU 999"), "{e}");
    assert!(e.to_string().contains("cpuset.cpus"), "{e}");
    assert!(g.cg.set_cpu_quota(Some((10, 100_000))).is_err());
    assert_eq!(g.cg.cpu_weight().unwrap(), 100);
    assert_eq!(g.cg.cpus().unwrap(), all);
}

#[test]
fn reports_host_capacity() {
    let h = cgroups::host_capacity().unwrap();
    assert!(h.cpus >= 1 && h.memory_bytes > 0, "{h:?}");
}
