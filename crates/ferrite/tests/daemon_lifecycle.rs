//! ferrited with real VMs: many VMs at once, graceful stop through the ACPI power button,
//! pause/resume/reboot, a daemon killed with SIGKILL and restarted re-adopts its VMs, a VMM
//! killed from outside is reported as crashed (and restarted when asked).

mod common;
mod daemon_common;

use std::time::Duration;

use daemon_common::{create, start, testguest_spec, TestDaemon};
use serde_json::{json, Value};

const READY: &str = "FERRITE-TESTGUEST READY";
const BOOT: Duration = Duration::from_secs(60);

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn test_ten_vms_start_boot_list_and_stop_gracefully() {
    let d = TestDaemon::start(&["--cpu-overcommit", "8"]);
    let vms: Vec<String> = (0..10)
        .map(|i| create(&d, testguest_spec(&format!("vm{i}"), &[])))
        .collect();

    for name in &vms {
        d.cli_ok(&["vm", "start", name]);
    }

    let listed: Value = serde_json::from_str(&d.cli_ok(&["--json", "vm", "ls"])).unwrap();
    assert_eq!(names(&listed), vms);
    for v in listed.as_array().unwrap() {
        assert_eq!(v["state"], "running", "{v}");
        assert!(v["pid"].as_u64().is_some(), "{v}");
    }
    for name in &vms {
        d.wait_console(name, READY, BOOT);
    }
    let table = d.cli_ok(&["vm", "ls"]);
    assert_eq!(table.matches("running").count(), 10, "{table}");

    let mut stop = vec!["vm", "stop", "--timeout", "30"];
    stop.extend(vms.iter().map(String::as_str));
    d.cli_ok(&stop);

    for name in &vms {
        let vm = d.vm(name);
        assert_eq!(vm["state"], "stopped", "{vm}");
        assert_eq!(vm["last_exit"]["outcome"], "poweroff", "{vm}");
        assert!(
            d.console_log(name).contains("OK power-button"),
            "{name}: {}",
            d.console_log(name)
        );
    }
    assert!(d.vmm_pids().is_empty());
}

#[test]
fn test_daemon_killed_with_sigkill_readopts_running_vms_on_restart() {
    let mut d = TestDaemon::start(&[]);
    let a = create(&d, testguest_spec("adopt-a", &[]));
    let b = create(&d, testguest_spec("adopt-b", &[]));
    start(&d, &a);
    start(&d, &b);
    d.wait_console(&a, READY, BOOT);
    let pid_a = d.vm(&a)["pid"].as_u64().unwrap();
    let pid_b = d.vm(&b)["pid"].as_u64().unwrap();

    d.kill_daemon();
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::path::Path::new(&format!("/proc/{pid_a}")).exists());
    d.spawn();

    let va = d.vm(&a);
    assert_eq!(va["state"], "running", "{va}");
    assert_eq!(va["pid"].as_u64(), Some(pid_a));
    assert_eq!(d.vm(&b)["pid"].as_u64(), Some(pid_b));
    let (_, events) = d.api("GET", "/v1/vms/adopt-a/stats", None);
    assert!(events["rss_bytes"].as_u64().unwrap() > 0, "{events}");
    // Still controllable: pause, resume, and a graceful stop the guest answers.
    d.cli_ok(&["vm", "pause", &a]);
    assert_eq!(d.state(&a), "paused");
    d.cli_ok(&["vm", "resume", &a]);
    assert_eq!(d.state(&a), "running");
    d.cli_ok(&["vm", "stop", &a, &b]);
    assert_eq!(d.vm(&a)["last_exit"]["outcome"], "poweroff");
    assert!(d.console_log(&b).contains("OK power-button"));
}

#[test]
fn test_vmm_killed_from_outside_is_reported_crashed() {
    let d = TestDaemon::start(&[]);
    let name = create(&d, testguest_spec("crashy", &[]));
    start(&d, &name);
    let pid = d.vm(&name)["pid"].as_u64().unwrap();

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };

    d.wait("state crashed", Duration::from_secs(10), || {
        d.state(&name) == "crashed"
    });
    let vm = d.vm(&name);
    assert_eq!(vm["last_exit"]["outcome"], "crashed", "{vm}");
    assert!(
        vm["last_exit"]["detail"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{vm}"
    );
    assert!(vm["pid"].is_null());
}

#[test]
fn test_crashed_vm_with_restart_on_crash_comes_back() {
    let d = TestDaemon::start(&[]);
    let mut spec = testguest_spec("phoenix", &[]);
    spec["restart_on_crash"] = json!(true);
    let name = create(&d, spec);
    start(&d, &name);
    d.wait_console(&name, READY, BOOT);
    let pid = d.vm(&name)["pid"].as_u64().unwrap();

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };

    d.wait("a new VMM process", Duration::from_secs(20), || {
        let vm = d.vm(&name);
        vm["state"] == "running" && vm["pid"].as_u64().is_some_and(|p| p != pid)
    });
    d.wait("the restarted guest's READY", BOOT, || {
        d.console_log(&name).matches(READY).count() >= 2
    });
    let vm = d.vm(&name);
    assert_eq!(vm["crash_restarts"], 1, "{vm}");
    assert_eq!(vm["last_exit"]["outcome"], "crashed");
    d.cli_ok(&["vm", "kill", &name]);
    assert_eq!(d.state(&name), "stopped");
}

#[test]
fn test_pause_stops_guest_progress_and_resume_continues_it() {
    let d = TestDaemon::start(&[]);
    let name = create(&d, testguest_spec("spinner", &["spin 0"]));
    start(&d, &name);
    d.wait_console(&name, "spin t=2", BOOT);

    d.cli_ok(&["vm", "pause", &name]);
    let frozen = d.console_log(&name).len();
    std::thread::sleep(Duration::from_millis(2500));
    let after_pause = d.console_log(&name).len();
    d.cli_ok(&["vm", "resume", &name]);
    let resumed_at = d.console_log(&name).matches("spin t=").count();
    d.wait("spin output after resume", Duration::from_secs(10), || {
        d.console_log(&name).matches("spin t=").count() > resumed_at
    });

    assert_eq!(frozen, after_pause, "the guest printed while paused");
    d.cli_ok(&["vm", "kill", &name]);
}

#[test]
fn test_reboot_restarts_the_guest_in_the_same_process() {
    let d = TestDaemon::start(&[]);
    let name = create(&d, testguest_spec("rebooter", &[]));
    start(&d, &name);
    d.wait_console(&name, READY, BOOT);
    let pid = d.vm(&name)["pid"].as_u64();

    d.cli_ok(&["vm", "reboot", &name]);

    d.wait("a second boot", BOOT, || {
        d.console_log(&name).matches(READY).count() >= 2
    });
    assert_eq!(d.vm(&name)["pid"].as_u64(), pid);
    assert_eq!(d.state(&name), "running");
    d.cli_ok(&["vm", "kill", &name]);
}
