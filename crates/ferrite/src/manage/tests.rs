//! Parsing of the management commands and the pure formatting helpers.

use clap::Parser;
use serde_json::json;

use super::set::update_body;
use super::*;
use crate::cli::{Cli, Command};

fn parse(args: &[&str]) -> Cli {
    let mut all = vec!["ferrite"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn vm_cmd(args: &[&str]) -> VmCommand {
    match parse(args).command {
        Command::Vm(v) => v.command,
        other => panic!("not vm: {other:?}"),
    }
}

fn set_args(args: &[&str]) -> SetArgs {
    let mut all = vec!["vm", "set", "web"];
    all.extend_from_slice(args);
    match vm_cmd(&all) {
        VmCommand::Set(a) => a,
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_global_socket_and_json_before_the_subcommand() {
    let cli = parse(&["--socket", "/tmp/s.sock", "--json", "vm", "ls"]);

    let g = cli.global();

    assert_eq!(g.socket, PathBuf::from("/tmp/s.sock"));
    assert!(g.json);
    assert!(matches!(cli.command, Command::Vm(_)));
}

#[test]
fn test_socket_defaults_without_flag() {
    let cli = parse(&["vm", "ls"]);

    let g = cli.global();

    assert!(!g.json);
    match std::env::var_os("FERRITE_SOCKET") {
        Some(s) if !s.is_empty() => assert_eq!(g.socket, PathBuf::from(s)),
        _ => assert_eq!(g.socket, PathBuf::from(api::DEFAULT_SOCKET)),
    }
}

#[test]
fn test_run_and_disk_still_parse() {
    assert!(matches!(
        parse(&["run", "--kernel", "/k"]).command,
        Command::Run(_)
    ));
    assert!(matches!(
        parse(&["disk", "info", "--json", "/x.qcow2"]).command,
        Command::Disk(_)
    ));
}

#[test]
fn test_ls_list_alias_and_local_json() {
    assert!(matches!(
        vm_cmd(&["vm", "ls"]),
        VmCommand::Ls { json: false }
    ));
    assert!(matches!(
        vm_cmd(&["vm", "list", "--json"]),
        VmCommand::Ls { json: true }
    ));
}

#[test]
fn test_lifecycle_commands_take_several_names() {
    for (cmd, alias) in [
        ("start", None),
        ("kill", None),
        ("pause", Some("suspend")),
        ("resume", None),
        ("reboot", Some("restart")),
    ] {
        for c in std::iter::once(cmd).chain(alias) {
            let parsed = vm_cmd(&["vm", c, "a", "b"]);
            let names = match parsed {
                VmCommand::Start(n)
                | VmCommand::Kill(n)
                | VmCommand::Pause(n)
                | VmCommand::Resume(n)
                | VmCommand::Reboot(n) => n.names,
                other => panic!("{c}: {other:?}"),
            };
            assert_eq!(names, ["a", "b"], "{c}");
        }
        assert!(
            Cli::try_parse_from(["ferrite", "vm", cmd]).is_err(),
            "{cmd} needs a name"
        );
    }
}

#[test]
fn test_stop_with_timeout_and_names() {
    match vm_cmd(&["vm", "stop", "--timeout", "30", "a", "b", "c"]) {
        VmCommand::Stop { names, timeout } => {
            assert_eq!(names, ["a", "b", "c"]);
            assert_eq!(timeout, Some(30));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        vm_cmd(&["vm", "stop", "a"]),
        VmCommand::Stop { timeout: None, .. }
    ));
}

#[test]
fn test_rm_show_console_log_events() {
    assert!(matches!(
        vm_cmd(&["vm", "rm", "--force", "a"]),
        VmCommand::Rm { force: true, .. }
    ));
    assert!(matches!(
        vm_cmd(&["vm", "delete", "a"]),
        VmCommand::Rm { force: false, .. }
    ));
    assert!(matches!(
        vm_cmd(&["vm", "show", "a"]),
        VmCommand::Show { .. }
    ));
    assert!(matches!(vm_cmd(&["vm", "console", "a"]), VmCommand::Console { name } if name == "a"));
    assert!(matches!(
        vm_cmd(&["vm", "log", "a", "--tail", "100"]),
        VmCommand::Log { tail: 100, .. }
    ));
    assert!(matches!(
        vm_cmd(&["vm", "events"]),
        VmCommand::Events { .. }
    ));
}

#[test]
fn test_create_builds_spec_with_absolute_paths() {
    let a = match vm_cmd(&[
        "vm",
        "create",
        "web",
        "--kernel",
        "vmlinux",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--disk",
        "root.qcow2,bw=20M",
        "--cpu-quota",
        "150",
        "--pin-cpus",
        "0-2,5",
    ]) {
        VmCommand::Create(a) => a,
        other => panic!("{other:?}"),
    };

    let spec = spec_from_args(&a).unwrap();

    assert_eq!(spec.name, "web");
    assert_eq!(spec.vcpus, 2);
    assert_eq!(spec.memory_mib, 1024);
    assert!(spec.kernel.starts_with('/') && spec.kernel.ends_with("/vmlinux"));
    assert!(spec.disks[0].starts_with('/') && spec.disks[0].ends_with("/root.qcow2,bw=20M"));
    assert_eq!(spec.resources.cpu_quota_pct, Some(150));
    assert_eq!(spec.resources.pin_cpus, [0, 1, 2, 5]);
    assert!(Cli::try_parse_from(["ferrite", "vm", "create", "x"]).is_err());
}

#[test]
fn test_set_none_sends_null_and_absent_stays_absent() {
    let body = update_body(&set_args(&["--cpu-quota", "none", "--cpu-weight", "50"])).unwrap();

    assert_eq!(
        body,
        json!({"resources": {"cpu_quota_pct": null, "cpu_weight": 50}})
    );
    let upd: api::VmUpdate = serde_json::from_value(body).unwrap();
    let r = upd.resources.unwrap();
    assert_eq!(r.cpu_quota_pct, Some(None));
    assert_eq!(r.memory_limit_mib, None);
}

#[test]
fn test_set_balloon_rate_limits_and_stopped_fields() {
    let body = update_body(&set_args(&[
        "--balloon",
        "32M",
        "--rate-limit",
        "disk0:bw=20M,iops=2000",
        "--rate-limit",
        "net0.rx:bw=1K",
        "--memory-limit",
        "2G",
        "--cpus",
        "4",
        "--memory",
        "1024",
        "--cmdline",
        "console=ttyS0",
        "--autostart",
        "true",
    ]))
    .unwrap();

    assert_eq!(
        body,
        json!({
            "balloon_mib": 32,
            "rate_limits": {
                "disk0": {"bytes_per_s": 20 << 20, "ops_per_s": 2000},
                "net0.rx": {"bytes_per_s": 1024}
            },
            "resources": {"memory_limit_mib": 2048},
            "vcpus": 4,
            "memory_mib": 1024,
            "cmdline": "console=ttyS0",
            "autostart": true
        })
    );
    let _: api::VmUpdate = serde_json::from_value(body).unwrap();
}

#[test]
fn test_set_refuses_nothing_and_bad_values() {
    assert!(update_body(&set_args(&[])).is_err());
    for bad in [
        &["--rate-limit", "disk0"][..],
        &["--rate-limit", "disk0:foo=1"],
        &["--cpu-quota", "lots"],
        &["--pin-cpus", "3-1"],
        &["--autostart", "maybe"],
    ] {
        let mut all = vec!["ferrite", "vm", "set", "web"];
        all.extend_from_slice(bad);
        assert!(Cli::try_parse_from(all).is_err(), "{bad:?}");
    }
}

#[test]
fn test_top_and_completions_parse() {
    match parse(&["top", "--once", "--interval", "0.5"]).command {
        Command::Top(t) => {
            assert!(t.once);
            assert_eq!(t.interval, 0.5);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse(&["completions", "bash"]).command,
        Command::Completions { .. }
    ));
}

#[test]
fn test_vm_table_and_formatting() {
    let info: api::VmInfo = serde_json::from_value(json!({
        "spec": {"name": "web", "kernel": "/k", "vcpus": 2, "memory_mib": 1024},
        "state": "running", "pid": 77, "started_at_ms": 1_000
    }))
    .unwrap();

    let t = vm_table(&[info], 1_000 + 3_723_000);

    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["web", "running", "2", "1G", "77", "1h02m"]
    );
    assert_eq!(format_bytes(1536), "1.5K");
    assert_eq!(format_bytes(512 << 20), "512M");
    assert_eq!(format_duration(59), "59s");
}

#[test]
fn test_top_table_rates_and_stopped_rows() {
    let mut a = api::VmStats {
        name: "a".into(),
        state: Some(api::VmState::Running),
        process_cpu_seconds: 1.0,
        rss_bytes: 100 << 20,
        ..Default::default()
    };
    a.disks.insert(
        "disk0".into(),
        api::IoCounters {
            read_bytes: 0,
            write_bytes: 0,
            ..Default::default()
        },
    );
    let mut a2 = a.clone();
    a2.process_cpu_seconds = 1.5;
    a2.disks.insert(
        "disk0".into(),
        api::IoCounters {
            read_bytes: 2 << 20,
            write_bytes: 0,
            ..Default::default()
        },
    );
    let b = api::VmStats {
        name: "b".into(),
        state: Some(api::VmState::Stopped),
        ..Default::default()
    };

    let t = top::top_table(&[a, b.clone()], &[a2, b], 1.0);

    let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        lines[0],
        ["NAME", "STATE", "CPU%", "RSS", "DISK-R/s", "DISK-W/s", "NET-RX/s", "NET-TX/s"]
    );
    assert_eq!(
        lines[1],
        ["a", "running", "50.0", "100M", "2M/s", "0B/s", "0B/s", "0B/s"]
    );
    assert_eq!(lines[2], ["b", "stopped", "-", "-", "-", "-", "-", "-"]);
}

#[test]
fn test_unreachable_socket_message() {
    let g = Global {
        socket: PathBuf::from("/nonexistent/x.sock"),
        json: false,
    };

    let err = vm(&g, VmCommand::Ls { json: false }).unwrap_err();

    assert_eq!(
        err.0,
        "Cannot reach ferrited at /nonexistent/x.sock: is it running? (start it with `ferrited`, or set --socket / FERRITE_SOCKET)"
    );
}

#[test]
fn test_cli_definition_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}
