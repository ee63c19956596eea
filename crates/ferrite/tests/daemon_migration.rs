//! Live migration between two daemons on one host: `ferrite vm migrate NAME --to B_SOCKET`
//! moves a counting guest (and one that keeps rewriting its memory) from daemon A to daemon
//! B; the guest continues on B from where it was, A forgets the VM and B runs it. A migration
//! the destination refuses, and one that is cancelled, leave the VM running on A and nothing
//! on B.

mod common;
mod daemon_common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::time::Duration;

use daemon_common::{create, event_kinds, start, testguest_spec, tls_certs, under, TestDaemon};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);

/// A daemon that takes incoming migrations on loopback.
fn daemon() -> TestDaemon {
    TestDaemon::start(&["--migration-addr", "127.0.0.1"])
}

/// `n` of every complete `tick n=K ...` line in `log` from byte `from` on.
fn ticks_from(log: &str, from: usize) -> Vec<u64> {
    log.get(from.min(log.len())..)
        .unwrap_or("")
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.strip_prefix("tick n="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Wait until VM `name`'s console on `d` has a tick numbered above `after`; returns it.
fn wait_tick_after(d: &TestDaemon, name: &str, after: u64) -> u64 {
    let start = std::time::Instant::now();
    while start.elapsed() < BOOT {
        let seen = ticks_from(&d.console_log(name), 0)
            .into_iter()
            .max()
            .unwrap_or(0);
        if seen > after {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out waiting for a tick of {name} after n={after}; console:\n{}\nvmm log:\n{}\ndaemon log:\n{}",
        d.console_log(name),
        d.vmm_log(name),
        d.daemon_log()
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn names(d: &TestDaemon) -> Vec<String> {
    let (status, list) = d.api("GET", "/v1/vms", None);
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// `promtool check metrics` finds nothing wrong with `text`.
fn promtool_accepts(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// Start a test guest running `cmds` on `d` and wait for its first tick.
fn start_guest(d: &TestDaemon, name: &str, cmds: &[&str]) {
    create(d, testguest_spec(name, cmds));
    start(d, name);
    wait_tick_after(d, name, 0);
}

#[test]
fn test_counting_guest_moves_to_another_daemon_and_counts_on_there() {
    let a = daemon();
    let b = daemon();
    start_guest(&a, "mover", &["count-forever 100"]);
    let before = wait_tick_after(&a, "mover", 2);
    let to = b.socket.display().to_string();

    let out = a.cli(&["vm", "migrate", "mover", "--to", &to, "--downtime-ms", "50"]);

    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate failed: {}\n{summary}\nA:\n{}\nB:\n{}\nB's VMM log:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log(),
        b.vmm_log("mover")
    );
    assert!(summary.contains("mover: migrated to"), "{summary}");
    eprintln!("{}", summary.trim());
    assert!(summary.contains("downtime"), "{summary}");
    // The guest continues on B from where it was on A.
    let after = wait_tick_after(&b, "mover", before);
    assert!(after > before);
    let first_on_b = ticks_from(&b.console_log("mover"), 0)[0];
    assert!(
        first_on_b > before,
        "B's first tick {first_on_b} should continue A's count (>{before})"
    );
    assert_eq!(b.state("mover"), "running");
    assert!(!names(&a).contains(&"mover".to_string()));
    let (status, _) = a.api("GET", "/v1/vms/mover", None);
    assert_eq!(status, 404);
    // A keeps the record of the migration; its metrics and events tell the story.
    let (status, m) = a.api("GET", "/v1/vms/mover/migration", None);
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["to"], to.as_str(), "{m}");
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert!(m["sent_bytes"].as_u64().unwrap() > 0, "{m}");
    let (_, metrics) = a.raw("GET", "/metrics", None).unwrap();
    assert!(
        metrics.contains("ferrite_migration_phase{vm=\"mover\",phase=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ferrite_migration_remaining_bytes{vm=\"mover\"}"));
    promtool_accepts(&metrics);
    let on_a = event_kinds(&a, "mover");
    for kind in ["migration-started", "migrated", "deleted"] {
        assert!(
            on_a.contains(&kind.to_string()),
            "{kind} missing on A: {on_a:?}"
        );
    }
    let on_b = event_kinds(&b, "mover");
    for kind in ["defined", "incoming", "running", "migrated-in"] {
        assert!(
            on_b.contains(&kind.to_string()),
            "{kind} missing on B: {on_b:?}"
        );
    }
    // The definition moved: B can stop it and start it afresh.
    let (status, info) = b.api("POST", "/v1/vms/mover/kill", None);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["spec"]["cmdline"], "cmds=\"count-forever 100\"");
}

#[test]
fn test_guest_memory_that_keeps_changing_arrives_intact() {
    let a = daemon();
    let b = daemon();
    start_guest(&a, "dirtier", &["dirty 8 1000", "dirty-check"]);
    let before = wait_tick_after(&a, "dirtier", 3);

    let out = a.cli(&[
        "vm",
        "migrate",
        "dirtier",
        "--to",
        &b.socket.display().to_string(),
        "--timeout",
        "60",
    ]);

    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log()
    );
    wait_tick_after(&b, "dirtier", before + 1);
    // A byte on the console stops `dirty`; `dirty-check` then verifies every page on B.
    let sock = under(&b, "run/vms/dirtier/console.sock");
    let mut console = UnixStream::connect(&sock).unwrap();
    console.write_all(b"q").unwrap();
    b.wait_console("dirtier", "OK dirty stopped", BOOT);
    b.wait_console("dirtier", "dirty-check ", BOOT);
    let log = b.console_log("dirtier");
    assert!(
        log.contains("OK dirty-check pages=2048"),
        "memory differs after the migration:\n{log}"
    );
}

#[test]
fn test_postcopy_through_the_daemons_runs_the_guest_on_the_destination_with_its_memory_whole() {
    // Arrange
    let a = daemon();
    let b = daemon();
    start_guest(&a, "pcopy", &["dirty 8 1000", "dirty-check"]);
    let before = wait_tick_after(&a, "pcopy", 3);

    // Act
    let out = a.cli(&[
        "vm",
        "migrate",
        "pcopy",
        "--to",
        &b.socket.display().to_string(),
        "--postcopy",
        "--timeout",
        "60",
    ]);
    wait_tick_after(&b, "pcopy", before + 1);
    let sock = under(&b, "run/vms/pcopy/console.sock");
    let mut console = UnixStream::connect(&sock).unwrap();
    console.write_all(b"q").unwrap();
    b.wait_console("pcopy", "OK dirty stopped", BOOT);
    b.wait_console("pcopy", "dirty-check ", BOOT);
    let log = b.console_log("pcopy");

    // Assert: moved, kept counting, every page arrived.
    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log()
    );
    assert!(
        log.contains("OK dirty-check pages=2048"),
        "memory differs after post-copy:\n{log}"
    );
}

#[test]
fn test_refused_and_cancelled_migrations_leave_the_vm_running_here() {
    let a = daemon();
    let b = daemon();
    let no_incoming = TestDaemon::start(&[]);
    start_guest(&a, "stayer", &["count-forever 100"]);
    create(&b, testguest_spec("stayer", &[]));
    let to_b = b.socket.display().to_string();

    // B has a VM of that name: refused before anything moves.
    let out = a.cli(&["vm", "migrate", "stayer", "--to", &to_b]);
    let (status, err) = a.api("POST", "/v1/vms/stayer/migrate", Some(json!({"to": to_b})));
    let (no_addr, err_no_addr) = a.api(
        "POST",
        "/v1/vms/stayer/migrate",
        Some(json!({"to": no_incoming.socket})),
    );
    let (bad_to, err_bad_to) = a.api(
        "POST",
        "/v1/vms/stayer/migrate",
        Some(json!({"to": "b.example:1"})),
    );
    let (idle, err_idle) = a.api("POST", "/v1/vms/stayer/migrate/cancel", None);

    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["code"], "conflict");
    assert_eq!(no_addr, 501, "{err_no_addr}");
    assert!(
        err_no_addr["message"]
            .as_str()
            .unwrap()
            .contains("--migration-addr"),
        "{err_no_addr}"
    );
    assert_eq!(bad_to, 400, "{err_bad_to}");
    assert_eq!(err_bad_to["field"], "to");
    assert_eq!(idle, 409, "{err_idle}");
    assert_eq!(a.state("stayer"), "running");
    assert_eq!(b.state("stayer"), "stopped");
    let (_, m) = a.api("GET", "/v1/vms/stayer/migration", None);
    assert_eq!(m["phase"], "none", "{m}");

    // Cancelled half-way (1 MiB/s makes the first pass last seconds): back as before.
    let (status, _) = b.api("DELETE", "/v1/vms/stayer", None);
    assert_eq!(status, 204);
    let (status, started) = a.api(
        "POST",
        "/v1/vms/stayer/migrate",
        Some(json!({"to": to_b, "bandwidth_mib_s": 1})),
    );
    assert_eq!(
        status,
        202,
        "{started}\nvmm log:\n{}\nconsole:\n{}\ndaemon log:\n{}",
        a.vmm_log("stayer"),
        a.console_log("stayer"),
        a.daemon_log()
    );
    assert_eq!(b.state("stayer"), "incoming");
    let cancel = a.cli(&["vm", "migrate", "stayer", "--cancel"]);

    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let (_, m) = a.api("GET", "/v1/vms/stayer/migration", None);
    assert_eq!(m["phase"], "cancelled", "{m}");
    let before = ticks_from(&a.console_log("stayer"), 0)
        .into_iter()
        .max()
        .unwrap();
    wait_tick_after(&a, "stayer", before);
    assert_eq!(a.state("stayer"), "running");
    b.wait("B to drop the reservation", Duration::from_secs(30), || {
        names(&b).is_empty()
    });
    let on_b = event_kinds(&b, "stayer");
    assert!(on_b.contains(&"incoming-failed".to_string()), "{on_b:?}");
    let on_a = event_kinds(&a, "stayer");
    assert!(
        on_a.contains(&"migration-cancelled".to_string()),
        "{on_a:?}"
    );
}

#[test]
fn test_migration_over_https_reaches_the_destination_on_its_tls_listener() {
    let dir = std::path::PathBuf::from(format!("/tmp/fd-mig-tls-{}", std::process::id()));
    tls_certs(&dir, &["a", "b"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = |name: &str| dir.join(name).display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let b = TestDaemon::start(&[
        "--migration-addr",
        "0.0.0.0",
        "--tls-listen",
        &listen,
        "--tls-cert",
        &f("b.pem"),
        "--tls-key",
        &f("b.key"),
        "--tls-client-ca",
        &f("ca.pem"),
    ]);
    let a = TestDaemon::start(&[
        "--tls-cert",
        &f("a.pem"),
        "--tls-key",
        &f("a.key"),
        "--tls-client-ca",
        &f("ca.pem"),
    ]);
    start_guest(&a, "far", &["count-forever 100"]);
    let before = wait_tick_after(&a, "far", 1);

    let out = a.cli(&[
        "vm",
        "migrate",
        "far",
        "--to",
        &format!("https://localhost:{port}"),
    ]);

    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log()
    );
    wait_tick_after(&b, "far", before);
    assert!(!names(&a).contains(&"far".to_string()));
    // B listened on every address: A's VMM went to the host it reached B's API at.
    let (_, m) = a.api("GET", "/v1/vms/far/migration", None);
    assert!(
        m["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("tcp:localhost:"),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_guest_with_a_disk_on_shared_storage_moves_and_both_sides_writes_land() {
    // Arrange: a guest that wrote a pattern to its raw disk and counts.
    let a = daemon();
    let b = daemon();
    let dir = std::env::temp_dir().join(format!("ferrite-dmig-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut spec = testguest_spec("disky", &["blk-write 0 0 64 7", "dirty 4 500 100"]);
    spec["disks"] = json!([format!("{},format=raw", disk.display())]);
    create(&a, spec);
    start(&a, "disky");
    let before = wait_tick_after(&a, "disky", 1);

    // Act: migrate, write more from B, stop it.
    let out = a.cli(&[
        "vm",
        "migrate",
        "disky",
        "--to",
        &b.socket.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log()
    );
    wait_tick_after(&b, "disky", before);
    let sock = under(&b, "run/vms/disky/console.sock");
    let mut console = UnixStream::connect(&sock).unwrap();
    console.write_all(b"x").unwrap();
    b.wait_console("disky", "OK dirty stopped", BOOT);
    console.write_all(b"blk-write 0 64 32 9\r").unwrap();
    b.wait_console("disky", "OK blk-write", BOOT);
    let (status, info) = b.api("POST", "/v1/vms/disky/kill", None);
    let on_disk = std::fs::read(&disk).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    // Assert: A's write and B's write are both in the image; B owns the definition.
    assert_eq!(status, 200, "{info}");
    assert!(!names(&a).contains(&"disky".to_string()));
    assert_eq!(
        &on_disk[..64 * 512],
        &pattern_bytes(7, 0, 64)[..],
        "the source's write"
    );
    assert_eq!(
        &on_disk[64 * 512..96 * 512],
        &pattern_bytes(9, 64, 32)[..],
        "the destination's write"
    );
}

#[test]
fn test_guest_with_a_local_disk_moves_with_copy_disks_into_the_destinations_state_dir() {
    // Arrange: a guest that wrote a pattern to its local raw disk and counts.
    let a = daemon();
    let b = daemon();
    let dir = std::env::temp_dir().join(format!("ferrite-dmig-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("local.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut spec = testguest_spec("copied", &["blk-write 0 0 64 7", "dirty 4 500 100"]);
    spec["disks"] = json!([format!("{},format=raw", disk.display())]);
    create(&a, spec);
    start(&a, "copied");
    let before = wait_tick_after(&a, "copied", 1);

    // Act: migrate with the disk's contents, write more on B, stop it.
    let out = a.cli(&[
        "vm",
        "migrate",
        "copied",
        "--copy-disks",
        "--to",
        &b.socket.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log()
    );
    wait_tick_after(&b, "copied", before);
    let sock = under(&b, "run/vms/copied/console.sock");
    let mut console = UnixStream::connect(&sock).unwrap();
    console.write_all(b"x").unwrap();
    b.wait_console("copied", "OK dirty stopped", BOOT);
    console.write_all(b"blk-check 0 0 64 7\r").unwrap();
    b.wait_console("copied", "OK blk-check", BOOT);
    console.write_all(b"blk-write 0 64 32 9\r").unwrap();
    b.wait_console("copied", "OK blk-write", BOOT);
    let (status, info) = b.api("POST", "/v1/vms/copied/kill", None);
    let (_, vm) = b.api("GET", "/v1/vms/copied", None);
    let received = under(&b, "state/disks/copied/local.img");
    let on_b = std::fs::read(&received).unwrap();
    let on_a = std::fs::read(&disk).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    // Assert: B runs on its own copy in its state dir (its definition points there); A's
    // image has the source's write only.
    assert_eq!(status, 200, "{info}");
    assert!(!names(&a).contains(&"copied".to_string()));
    assert_eq!(
        vm["spec"]["disks"][0],
        format!("{},format=raw", received.display()),
        "{vm}"
    );
    assert_eq!(&on_b[..64 * 512], &pattern_bytes(7, 0, 64)[..]);
    assert_eq!(&on_b[64 * 512..96 * 512], &pattern_bytes(9, 64, 32)[..]);
    assert_eq!(&on_a[..64 * 512], &pattern_bytes(7, 0, 64)[..]);
    assert!(
        on_a[64 * 512..].iter().all(|&b| b == 0),
        "A's image changed after the commit"
    );
}

fn pattern_bytes(seed: u64, sector: u64, count: u64) -> Vec<u8> {
    let mut out = vec![0u8; count as usize * common::pattern::SECTOR_SIZE];
    for (k, chunk) in out
        .chunks_exact_mut(common::pattern::SECTOR_SIZE)
        .enumerate()
    {
        common::pattern::fill_sector(seed, sector + k as u64, chunk);
    }
    out
}

/// A scratch directory for certificates, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::path::PathBuf::from(format!("/tmp/fd-mtls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_local_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon with `cert`/`key` as its certificate, trusting `ca`, taking incoming migrations
/// on loopback, and with `listen`, serving HTTPS on that loopback port.
fn tls_daemon(cert: &str, key: &str, ca: &str, listen: Option<u16>) -> TestDaemon {
    let listen = listen.map(|p| format!("127.0.0.1:{p}"));
    let mut args = vec![
        "--migration-addr",
        "127.0.0.1",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-client-ca",
        ca,
    ];
    if let Some(l) = &listen {
        args.extend(["--tls-listen", l.as_str()]);
    }
    TestDaemon::start(&args)
}

/// The port of a `tcp:HOST:PORT` endpoint.
fn endpoint_port(endpoint: &str) -> u16 {
    endpoint.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn test_tls_daemons_carry_the_migration_stream_in_tls_and_the_guest_counts_on() {
    // Arrange: two daemons with certificates from one CA, B serving HTTPS; a counting guest
    // on A; everything on loopback recorded.
    let pki = Scratch::new("ok");
    tls_certs(&pki.0, &["a", "b"]);
    let port = free_local_port();
    let b = tls_daemon(
        &pki.file("b.pem"),
        &pki.file("b.key"),
        &pki.file("ca.pem"),
        Some(port),
    );
    let a = tls_daemon(
        &pki.file("a.pem"),
        &pki.file("a.key"),
        &pki.file("ca.pem"),
        None,
    );
    start_guest(&a, "sealed", &["count-forever 100"]);
    let before = wait_tick_after(&a, "sealed", 2);
    let capture = daemon_common::wire::LoopbackCapture::start(&[b"FERRMIG", b"ferrite_version"]);

    // Act
    let out = a.cli(&[
        "vm",
        "migrate",
        "sealed",
        "--to",
        &format!("https://localhost:{port}"),
    ]);

    // Assert: the guest continues on B from its own count; the record and the CLI say TLS;
    // the wire to B's VMM carried TLS records only.
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate failed: {}\nA:\n{}\nB:\n{}\nB's VMM log:\n{}",
        stderr(&out),
        a.daemon_log(),
        b.daemon_log(),
        b.vmm_log("sealed")
    );
    assert!(summary.contains("over TLS"), "{summary}");
    eprintln!("{}", summary.trim());
    let after = wait_tick_after(&b, "sealed", before);
    assert!(
        ticks_from(&b.console_log("sealed"), 0)[0] > before,
        "{after}"
    );
    assert!(!names(&a).contains(&"sealed".to_string()));
    let (_, m) = a.api("GET", "/v1/vms/sealed/migration", None);
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["tls"], true, "{m}");
    let endpoint = m["endpoint"].as_str().unwrap();
    assert!(endpoint.starts_with("tcp:127.0.0.1:"), "{m}");
    let flow = capture.flow(endpoint_port(endpoint));
    drop(capture);
    assert!(flow.bytes > 64 << 10, "{flow:?}");
    assert_eq!(
        &flow.first[..2],
        &[0x16, 0x03],
        "a TLS handshake first: {flow:?}"
    );
    assert_eq!(
        flow.found,
        [false, false],
        "the stream or its hello went out in clear"
    );
}

#[test]
fn test_destination_certificate_from_another_ca_is_refused_before_memory_moves() {
    // Arrange: B's certificate is signed by a CA A does not trust (B trusts A's CA).
    let pki = Scratch::new("cluster");
    tls_certs(&pki.0, &["a"]);
    let rogue = Scratch::new("rogue");
    tls_certs(&rogue.0, &["b"]);
    let port = free_local_port();
    let b = tls_daemon(
        &rogue.file("b.pem"),
        &rogue.file("b.key"),
        &pki.file("ca.pem"),
        Some(port),
    );
    let a = tls_daemon(
        &pki.file("a.pem"),
        &pki.file("a.key"),
        &pki.file("ca.pem"),
        None,
    );
    start_guest(&a, "guarded", &["count-forever 100"]);

    // Act: over HTTPS (B's API), then over B's Unix socket (the VMMs' handshake).
    let https = a.cli(&[
        "vm",
        "migrate",
        "guarded",
        "--to",
        &format!("https://localhost:{port}"),
    ]);
    let unix = a.cli(&[
        "vm",
        "migrate",
        "guarded",
        "--to",
        &b.socket.display().to_string(),
    ]);

    // Assert: both refused for B's certificate; nothing of the guest moved; it counts on A.
    assert!(!https.status.success());
    assert!(
        // (BadSignature: both test CAs are named CN=ferrite-ca.)
        stderr(&https).contains("invalid peer certificate"),
        "{}",
        stderr(&https)
    );
    assert!(!unix.status.success());
    let why = stderr(&unix);
    assert!(
        why.contains("certificate this source does not accept") && why.contains("keeps running"),
        "{why}\nA:\n{}",
        a.daemon_log()
    );
    let (_, m) = a.api("GET", "/v1/vms/guarded/migration", None);
    assert_eq!(m["phase"], "failed", "{m}");
    assert_eq!(m["tls"], true, "{m}");
    assert_eq!(m["pages_sent"], 0, "{m}");
    let now = ticks_from(&a.console_log("guarded"), 0)
        .into_iter()
        .max()
        .unwrap();
    wait_tick_after(&a, "guarded", now);
    assert_eq!(a.state("guarded"), "running");
    b.wait("B to drop the reservation", Duration::from_secs(30), || {
        names(&b).is_empty()
    });
    assert!(!b.console_log("guarded").contains("tick"));
}

#[test]
fn test_tls_destination_refuses_plaintext_streams_except_on_loopback_for_this_host() {
    // Arrange: a TLS daemon listening for migrations on every address.
    let pki = Scratch::new("plain");
    tls_certs(&pki.0, &["b"]);
    let b = TestDaemon::start(&[
        "--migration-addr",
        "0.0.0.0",
        "--tls-cert",
        &pki.file("b.pem"),
        "--tls-key",
        &pki.file("b.key"),
        "--tls-client-ca",
        &pki.file("ca.pem"),
    ]);
    let reserve = |name: &str, tls: bool| {
        b.api(
            "POST",
            "/v1/migrations/incoming",
            Some(json!({"spec": testguest_spec(name, &[]), "tls": tls})),
        )
    };

    // Act: a source offering TLS, then one that does not (on this host, over the socket).
    let (tls_status, tls_res) = reserve("sealed", true);
    let (plain_status, plain_res) = reserve("local", false);
    // A plaintext source at the TLS-only VMM: the protocol's magic and a hello.
    let endpoint = tls_res["endpoint"].as_str().unwrap_or("tcp:0.0.0.0:0");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", endpoint_port(endpoint))).unwrap();
    raw.write_all(b"FERRMIG\0\x01\x00\x00\x00\x02\x00\x00\x00{}")
        .unwrap();
    let mut answer = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = std::io::Read::read_to_end(&mut raw, &mut answer);

    // Assert: TLS on every address with the certificate's name; plaintext only on loopback;
    // the TLS-only VMM refused the plaintext source and the reservation is gone.
    assert_eq!(tls_status, 201, "{tls_res}");
    assert_eq!(tls_res["tls"], true, "{tls_res}");
    assert!(endpoint.starts_with("tcp:0.0.0.0:"), "{tls_res}");
    assert_eq!(tls_res["tls_server_name"], "localhost", "{tls_res}");
    assert_eq!(plain_status, 201, "{plain_res}");
    assert_eq!(plain_res["tls"], false, "{plain_res}");
    assert!(
        plain_res["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("tcp:127.0.0.1:"),
        "{plain_res}"
    );
    assert!(
        String::from_utf8_lossy(&answer).contains("only TLS"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    b.wait("B to drop the refused reservation", BOOT, || {
        !names(&b).contains(&"sealed".to_string())
    });
    assert!(
        b.vmm_log("sealed").contains("without TLS"),
        "{}",
        b.vmm_log("sealed")
    );
}
