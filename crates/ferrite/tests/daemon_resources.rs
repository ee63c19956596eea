//! ferrited's resource control and monitoring with real guests: a lower CPU quota slows the
//! guest's CPU-bound loop, a balloon target change reaches the guest and the metrics,
//! `/metrics` passes promtool, stats and the event stream report what happened, the console
//! attaches through the daemon, and the TLS listener wants a client certificate.

mod common;
mod daemon_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon_common::{create, new_key_and_request, openssl, start, testguest_spec, TestDaemon};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(60);

/// Iterations per second the guest's `spin` reported in lines after the first `skip` ones.
fn spin_rates(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.starts_with("spin t="))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("iters="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn test_lowering_cpu_quota_slows_the_guest_and_shows_throttling() {
    let d = TestDaemon::start(&[]);
    let name = create(&d, testguest_spec("quota", &["spin 0"]));
    start(&d, &name);
    d.wait_console(&name, "spin t=4", BOOT);
    let before = spin_rates(&d.console_log(&name));
    let full = median(before[1..].to_vec());

    let (status, v) = d.api(
        "PATCH",
        "/v1/vms/quota",
        Some(json!({"resources": {"cpu_quota_pct": 10}})),
    );
    assert_eq!(status, 200, "{v}");
    let seen = before.len();
    d.wait("5 more spin lines", Duration::from_secs(60), || {
        spin_rates(&d.console_log(&name)).len() >= seen + 5
    });
    let after = spin_rates(&d.console_log(&name));
    let throttled = median(after[seen + 1..].to_vec());
    let (_, stats) = d.api("GET", "/v1/vms/quota/stats", None);

    assert!(
        throttled * 2 < full,
        "quota 10% did not slow the guest: {full} -> {throttled} iterations/s ({after:?})"
    );
    assert!(
        stats["cpu_throttled_seconds"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    assert_eq!(d.vm(&name)["spec"]["resources"]["cpu_quota_pct"], 10);
    d.cli_ok(&["vm", "kill", &name]);
}

#[test]
fn test_balloon_target_change_reaches_guest_and_metrics() {
    let d = TestDaemon::start(&[]);
    let mut spec = testguest_spec("bal", &["balloon-run 120"]);
    spec["balloon"] = json!("");
    let name = create(&d, spec);
    start(&d, &name);
    d.wait_console(&name, "balloon-run started", BOOT);

    d.cli_ok(&["vm", "set", &name, "--balloon", "32M"]);

    d.wait_console(&name, "balloon actual_mib=32 target_mib=32", BOOT);
    d.wait("balloon size in the stats", Duration::from_secs(20), || {
        let (_, s) = d.api("GET", "/v1/vms/bal/stats", None);
        s["balloon_bytes"].as_u64() == Some(32 << 20)
    });
    let (status, metrics) = d.raw("GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "ferrite_vm_balloon_target_bytes{{vm=\"bal\"}} {}",
            32u64 << 20
        )),
        "{metrics}"
    );
    d.cli_ok(&["vm", "kill", &name]);
}

#[test]
fn test_metrics_pass_promtool_and_stats_report_the_vm() {
    let d = TestDaemon::start(&[]);
    let disk = common::asset("testguest.elf"); // any file works as a read-only disk
    let mut spec = testguest_spec("mon", &["blk-sum 0 0 8", "spin 0"]);
    spec["disks"] = json!([format!("{},readonly", disk.display())]);
    let name = create(&d, spec);
    create(&d, testguest_spec("idle-stopped", &[]));
    start(&d, &name);
    d.wait_console(&name, "spin t=2", BOOT);

    let (status, text) = d.raw("GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian package prometheus) is needed: scripts/install-deps.sh installs it",
        );
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let (_, stats) = d.api("GET", "/v1/vms/mon/stats", None);

    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ferrite_vm_up{vm=\"mon\"} 1"), "{text}");
    assert!(stats["vcpu_seconds"][0].as_f64().unwrap() > 0.5, "{stats}");
    assert!(
        stats["exits"]
            .as_object()
            .unwrap()
            .values()
            .any(|v| v.as_u64() > Some(0)),
        "{stats}"
    );
    assert!(stats["rss_bytes"].as_u64().unwrap() > 1 << 20, "{stats}");
    assert!(
        stats["disks"]["disk0"]["read_ops"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["uptime_s"].as_f64().unwrap() > 0.0, "{stats}");
    let top = d.cli_ok(&["top", "--once"]);
    assert!(top.contains("mon") && top.contains("idle-stopped"), "{top}");
    d.cli_ok(&["vm", "kill", &name]);
}

#[test]
fn test_event_stream_reports_lifecycle_changes() {
    let d = TestDaemon::start(&[]);
    let mut sse = Command::new("curl")
        .args(["-sN", "--unix-socket"])
        .arg(&d.socket)
        .arg("http://ferrited/v1/events")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sse.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut kinds = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data:") {
                let ev: Value = serde_json::from_str(data.trim()).unwrap();
                kinds.push(format!(
                    "{}:{}",
                    ev["vm"].as_str().unwrap(),
                    ev["kind"].as_str().unwrap()
                ));
                if ev["kind"] == "deleted" {
                    break;
                }
            }
        }
        kinds
    });
    std::thread::sleep(Duration::from_millis(300));

    let name = create(&d, testguest_spec("ev", &[]));
    start(&d, &name);
    d.cli_ok(&["vm", "stop", &name]);
    d.cli_ok(&["vm", "rm", &name]);

    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sse.kill();
    let _ = sse.wait();
    let kinds = reader.join().unwrap();
    assert_eq!(
        kinds,
        [
            "ev:defined",
            "ev:starting",
            "ev:running",
            "ev:stopping",
            "ev:stopped",
            "ev:deleted"
        ]
    );
}

#[test]
fn test_console_attaches_through_the_daemon_and_detaches_without_stopping() {
    let d = TestDaemon::start(&[]);
    let name = create(&d, testguest_spec("con", &[]));
    start(&d, &name);
    d.wait_console(&name, "FERRITE-TESTGUEST READY", BOOT);

    let mut cli = Command::new(common::ferrite_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["vm", "console", &name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"echo through-the-daemon\r\n").unwrap();
    d.wait_console(&name, "through-the-daemon", Duration::from_secs(20));
    drop(stdin);
    let out = cli.wait_with_output().unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("through-the-daemon"),
        "console output: {stdout}"
    );
    assert_eq!(d.state(&name), "running");
    let (status, log) = d
        .raw("GET", "/v1/vms/con/console/log?tail=100000", None)
        .unwrap();
    assert_eq!(status, 200);
    assert!(log.contains("through-the-daemon"));
    d.cli_ok(&["vm", "kill", &name]);
}

#[test]
fn test_tls_listener_requires_a_client_certificate_from_the_ca() {
    let dir = std::path::PathBuf::from(format!("/tmp/fd-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, cn) in [("ca", "ferrite-ca"), ("other-ca", "other")] {
        new_key_and_request(&dir, name, cn, &["-x509", "-days", "2"], "pem");
    }
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    for (name, ca) in [("server", "ca"), ("client", "ca"), ("rogue", "other-ca")] {
        new_key_and_request(&dir, name, name, &[], "csr");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
            &dir,
        );
    }
    let port = 20000 + (std::process::id() % 20000);
    let p = |f: &str| dir.join(f).display().to_string();
    let d = TestDaemon::start(&[
        "--tls-listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        &p("server.pem"),
        "--tls-key",
        &p("server.key"),
        "--tls-client-ca",
        &p("ca.pem"),
    ]);
    let curl = |cert: Option<&str>| {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            &p("ca.pem"),
        ]);
        if let Some(name) = cert {
            c.args([
                "--cert",
                &p(&format!("{name}.pem")),
                "--key",
                &p(&format!("{name}.key")),
            ]);
        }
        c.arg(format!("https://localhost:{port}/v1/host"));
        String::from_utf8_lossy(&c.output().unwrap().stdout).to_string()
    };

    let with_client = curl(Some("client"));
    let without = curl(None);
    let rogue = curl(Some("rogue"));

    assert_eq!(with_client, "200", "{}", d.daemon_log());
    assert_eq!(without, "000");
    assert_eq!(rogue, "000");
    let _ = std::fs::remove_dir_all(&dir);
}
