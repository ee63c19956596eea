//! Rate limits against the test guest: a disk limited in bytes/s or operations/s delivers
//! within a generous band around the limit (and an unlimited disk is clearly faster), a
//! disk limit raised through the control socket while the guest reads takes effect, NIC
//! limits hold a UDP flood to the configured rate in each direction (and follow a live
//! change), and a limited virtio-rng hands out entropy at about its rate.
//!
//! These tests check that the limiters work; the benchmark measures their precision. A
//! disk read is timed by the guest's `time` answers around it (TSC, which runs at wall-clock
//! rate), rng reads by the guest's own `ms=`, the network by the host counting echoes, and
//! the live change by the host's clock. A first read drains the bucket's initial full
//! second, so the measured one runs at the steady rate.

mod common;

use common::netns::Netns;
mod testguest_common;

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stream::{run_ferrite_until, StreamedRun};
use testguest_common::{num, ScratchDisk, READY, WATCHDOG};

const MIB: f64 = (1 << 20) as f64;
/// Sectors per guest request (`blk-sum` reads 64 KiB at a time).
const SECTORS_PER_REQUEST: u64 = 128;

/// Boot the test guest with `extra` flags and `cmds` (ending in `poweroff`), to the end.
fn run_guest(extra: &[String], cmds: &[&str]) -> StreamedRun {
    let kernel = common::asset("testguest.elf");
    let cmdline = format!("cmds=\"{}\"", cmds.join(";"));
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--cmdline".into(),
        cmdline,
    ];
    args.extend(extra.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_ferrite_until(&argv, WATCHDOG, |_| false);
    assert_eq!(
        run.output.code,
        Some(0),
        "guest did not power off cleanly:\n{}\n--- stderr ---\n{}",
        run.tail(40),
        run.output.stderr
    );
    run
}

/// Seconds of guest time between the first and second `time` answers; every `blk-sum`
/// must have succeeded.
fn timed(run: &StreamedRun) -> f64 {
    for l in run.all("blk-sum") {
        assert!(
            l.text.starts_with("OK "),
            "failed: {}\n{}",
            l.text,
            run.tail(40)
        );
    }
    let t: Vec<(u64, u64)> = run
        .all("OK time ")
        .map(|l| (num(&l.text, "tsc"), num(&l.text, "tsc_hz")))
        .collect();
    assert!(t.len() >= 2, "two time answers expected:\n{}", run.tail(40));
    assert!(t[0].1 > 0, "no TSC frequency:\n{}", run.tail(40));
    t[1].0.saturating_sub(t[0].0) as f64 / t[0].1 as f64
}

/// An 18 MiB disk, read as 6 MiB (empties the initial 4 MiB bucket and waits on it) then
/// 12 MiB (timed).
fn timed_disk_read(disk: &ScratchDisk, opts: &str) -> f64 {
    let run = run_guest(
        &["--disk".into(), format!("{}{opts}", disk.arg())],
        &[
            "blk-sum 0 0 12288",
            "time",
            "blk-sum 0 12288 24576",
            "time",
            "poweroff",
        ],
    );
    timed(&run)
}

#[test]
fn test_disk_bw_limit_delivers_about_the_limit_and_unlimited_is_faster() {
    // Arrange
    common::require_kvm();
    let disk = ScratchDisk::zeroed("rl-bw", 18 << 20);

    // Act
    let limited_s = timed_disk_read(&disk, ",bw=4M");
    let unlimited_s = timed_disk_read(&disk, "");

    // Assert: 12 MiB at 4 MiB/s is 3 s; the band is generous (2..6 MiB/s).
    let limited = 12.0 / limited_s;
    let unlimited = 12.0 / unlimited_s;
    eprintln!("disk bw=4M: {limited:.2} MiB/s; unlimited: {unlimited:.1} MiB/s");
    assert!(
        (2.0..=6.0).contains(&limited),
        "limited to 4 MiB/s but delivered {limited:.2} MiB/s"
    );
    assert!(
        unlimited > 2.0 * limited,
        "unlimited ({unlimited:.2} MiB/s) is not clearly faster than limited ({limited:.2})"
    );
}

#[test]
fn test_disk_iops_limit_delivers_about_the_limit() {
    // Arrange: 75 requests empty the 50-request bucket, then 100 requests are timed (2 s
    // at 50/s).
    common::require_kvm();
    let disk = ScratchDisk::zeroed("rl-iops", 12 << 20);
    let drain = 75 * SECTORS_PER_REQUEST;
    let measured = 100 * SECTORS_PER_REQUEST;
    let cmds = [
        format!("blk-sum 0 0 {drain}"),
        "time".to_string(),
        format!("blk-sum 0 {drain} {measured}"),
        "time".to_string(),
        "poweroff".to_string(),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();

    // Act
    let run = run_guest(&["--disk".into(), format!("{},iops=50", disk.arg())], &cmds);

    // Assert: a generous band (25..100 requests/s) around 50.
    let iops = 100.0 / timed(&run);
    eprintln!("disk iops=50: {iops:.1} requests/s");
    assert!(
        (25.0..=100.0).contains(&iops),
        "limited to 50 requests/s but served {iops:.1}/s"
    );
}

/// A running guest whose console lines arrive on a channel, killed on drop.
struct LiveGuest {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
}

impl LiveGuest {
    fn start(args: &[String]) -> Self {
        common::require_kvm();
        let mut child = Command::new(common::ferrite_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferrite");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        LiveGuest {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (within the watchdog) for a line starting with `prefix`; returns when it came.
    fn wait_for(&mut self, prefix: &str) -> (Instant, String) {
        loop {
            match self.lines.recv_timeout(WATCHDOG) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return (at, line);
                    }
                }
                Err(_) => panic!("no {prefix:?} line; console so far: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for LiveGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_request(conn: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    conn.get_mut().write_all(line.as_bytes()).unwrap();
    conn.get_mut().write_all(b"\n").unwrap();
    let mut reply = String::new();
    conn.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn socket_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "ferrite-rl-{}-{}-{name}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn run_args(disk: &Path, disk_opts: &str, sock: &Path, cmds: &[&str]) -> Vec<String> {
    vec![
        "run".into(),
        "--kernel".into(),
        common::asset("testguest.elf").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--cmdline".into(),
        format!("cmds=\"{}\"", cmds.join(";")),
        "--disk".into(),
        format!("{}{disk_opts}", disk.display()),
        "--api-socket".into(),
        sock.display().to_string(),
    ]
}

#[test]
fn test_disk_limit_raised_through_control_socket_speeds_up_running_read() {
    // Arrange: 2 MiB/s; 2 MiB drain the bucket, then a 32 MiB read would take 16 s.
    let disk = ScratchDisk::zeroed("rl-live", 32 << 20);
    let sock = socket_path("live");
    let mut guest = LiveGuest::start(&run_args(
        disk.path(),
        ",bw=2M",
        &sock,
        &["blk-sum 0 0 4096", "blk-sum 0 0 65536", "poweroff"],
    ));
    guest.wait_for(READY);
    let (drained_at, _) = guest.wait_for("OK blk-sum");
    let mut conn = BufReader::new(UnixStream::connect(&sock).expect("connect api socket"));
    std::thread::sleep(Duration::from_secs(1));

    // Act
    let before = api_request(&mut conn, r#"{"op":"stats"}"#);
    let raised = api_request(
        &mut conn,
        r#"{"op":"rate-limit","device":"disk0","bytes_per_s":0,"ops_per_s":0}"#,
    );
    let raised_at = Instant::now();
    let (done_at, done) = guest.wait_for("OK blk-sum");
    guest.wait_for("OK poweroff");

    // Assert: before the change the disk ran at about 2 MiB/s (2 MiB + ~1 s worth, far
    // from the 34 MiB asked for); after it the rest came much faster than the 16 s the
    // old limit needed.
    assert_eq!(raised["ok"], true, "{raised}");
    assert!(raised["limit"]["bandwidth"].is_null(), "{raised}");
    let read_before = before["devices"]["disk0"]["read_bytes"]
        .as_u64()
        .expect("disk0 read_bytes in stats") as f64
        / MIB;
    let limited_s = (raised_at - drained_at).as_secs_f64();
    let rest_s = (done_at - raised_at).as_secs_f64();
    eprintln!(
        "live raise: {read_before:.1} MiB read in the limited {limited_s:.2} s, the rest in \
         {rest_s:.2} s"
    );
    assert!(
        read_before < 2.0 + 3.0 * 2.0 * limited_s,
        "{read_before:.1} MiB read before the change: the 2 MiB/s limit did not hold"
    );
    assert!(
        rest_s < 8.0,
        "the rest of the read took {rest_s:.1} s after the limit was lifted: {done}"
    );
}

// ---- Networking: a network namespace per test, as in testguest_net.rs. ----

fn ping_once(addr: &str) -> bool {
    Command::new("ping")
        .args(["-c", "1", "-W", "1", addr])
        .stdout(Stdio::null())
        .status()
        .expect("run ping (iputils-ping)")
        .success()
}

/// Flood the guest's UDP echo port with `payload`-byte datagrams at about `pps` for
/// `secs`; returns the echoes per second counted in the steady window [1.5 s, 3.5 s) after
/// the flood started (the first second's bucket is spent before it).
fn echo_rate_under_flood(addr: &str, payload: usize, pps: u64, secs: u64) -> f64 {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.connect((addr, 7)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sender = sock.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let stop_tx = stop.clone();
    let flood = std::thread::spawn(move || {
        let datagram = vec![0x5a; payload];
        let interval = Duration::from_secs(1) / u32::try_from(pps).unwrap();
        let mut next = Instant::now();
        while !stop_tx.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(secs) {
            // A full TAP queue drops; that is the point of the flood.
            let _ = sender.send(&datagram);
            next += interval;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    });
    let window = Duration::from_millis(1500)..Duration::from_millis(3500);
    let mut in_window = 0u64;
    let mut corrupt = 0u64;
    let mut buf = vec![0u8; 2048];
    while start.elapsed() < window.end {
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        if n != payload || buf[..n].iter().any(|&b| b != 0x5a) {
            corrupt += 1;
        } else if window.contains(&start.elapsed()) {
            in_window += 1;
        }
    }
    assert_eq!(corrupt, 0, "corrupted echoes");
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    in_window as f64 / (window.end - window.start).as_secs_f64()
}

/// What one NIC run measured.
struct NetRates {
    /// Echoes/s under the limits given at start.
    first: f64,
    /// Echoes/s after `change` was sent to the control socket.
    after_change: Option<f64>,
    /// The control socket's `info` answer at the start.
    info: serde_json::Value,
}

/// Boot a guest on TAP `ft0` with `net_opts` and a control socket, serve echoes, and
/// measure the echo rate of a 1000 pps flood of `payload`-byte datagrams; with `change`,
/// send it to the control socket and measure again.
fn limited_echo_rates(net_opts: &str, payload: usize, change: Option<&str>) -> NetRates {
    common::require_kvm();
    let ns = Netns::enter();
    ns.tap("ft0", "10.0.0.1/24");
    let sock = socket_path("net");
    let args = vec![
        "--net".to_string(),
        format!("tap=ft0,mac=52:54:00:00:00:02{net_opts}"),
        "--api-socket".to_string(),
        sock.display().to_string(),
    ];
    let serve = if change.is_some() {
        "net-serve 16"
    } else {
        "net-serve 12"
    };
    let vm =
        std::thread::spawn(move || run_guest(&args, &["net-up 0 10.0.0.2/24", serve, "poweroff"]));
    let up = Instant::now();
    while !ping_once("10.0.0.2") {
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "the guest never answered a ping"
        );
    }
    let mut conn = BufReader::new(UnixStream::connect(&sock).expect("connect api socket"));
    let info = api_request(&mut conn, r#"{"op":"info"}"#);
    let first = echo_rate_under_flood("10.0.0.2", payload, 1000, 4);
    let after_change = change.map(|req| {
        let reply = api_request(&mut conn, req);
        assert_eq!(reply["ok"], true, "{reply}");
        // Let the first flood's backlog in the TAP drain.
        std::thread::sleep(Duration::from_millis(1500));
        echo_rate_under_flood("10.0.0.2", payload, 1000, 4)
    });
    let run = vm.join().unwrap();
    // `bad` is not judged: once a flood's socket is closed, the host answers the echoes
    // still queued with ICMP port-unreachable, which the guest counts as bad.
    let served = run
        .first("OK net-serve frames=")
        .unwrap_or_else(|| panic!("net-serve did not finish:\n{}", run.tail(20)));
    assert!(num(&served.text, "udp") > 0, "{}", served.text);
    drop(ns);
    NetRates {
        first,
        after_change,
        info,
    }
}

#[test]
fn test_net_rx_pps_limit_holds_udp_flood_and_follows_live_change() {
    // Act: 1000 datagrams/s offered, 200 packets/s let into the guest; then 400/s.
    let r = limited_echo_rates(
        ",rx-pps=200",
        64,
        Some(r#"{"op":"rate-limit","device":"net0","direction":"rx","ops_per_s":400}"#),
    );

    // Assert: generous bands around 200/s and 400/s; both directions are on the socket.
    let raised = r.after_change.unwrap();
    eprintln!(
        "net rx-pps=200: {:.0} echoes/s; raised to 400: {raised:.0}",
        r.first
    );
    assert_eq!(
        r.info["rate_limits"]["net0.rx"]["ops"]["size"], 200,
        "{}",
        r.info
    );
    assert!(
        r.info["rate_limits"]["net0.tx"]["ops"].is_null(),
        "{}",
        r.info
    );
    assert!(
        (100.0..=300.0).contains(&r.first),
        "rx limited to 200 packets/s but {:.0} echoes/s came back",
        r.first
    );
    assert!(
        (250.0..=600.0).contains(&raised) && raised > 1.3 * r.first,
        "rx raised to 400 packets/s but {raised:.0} echoes/s came back (before: {:.0})",
        r.first
    );
}

#[test]
fn test_net_tx_bw_limit_holds_udp_echoes_to_the_limit() {
    // Act: 1000-byte datagrams (1042-byte frames) echoed, 200 KiB/s let out of the guest,
    // about 197 frames/s.
    let rate = limited_echo_rates(",tx-bw=200K", 1000, None).first;

    // Assert: a generous band around 197/s.
    let expected = 200.0 * 1024.0 / 1042.0;
    eprintln!("net tx-bw=200K: {rate:.0} echoes/s (limit {expected:.0})");
    assert!(
        (0.5 * expected..=1.5 * expected).contains(&rate),
        "tx limited to {expected:.0} frames/s but {rate:.0} echoes/s came back"
    );
}

#[test]
fn test_rng_bw_limit_reads_at_about_the_limit() {
    // Arrange: 64 KiB/s; 64 KiB drain the bucket, then 128 KiB take about 2 s.
    common::require_kvm();
    let cmds = ["rng 65536", "rng 131072", "poweroff"];

    // Act
    let limited = run_guest(&["--rng=bw=64K".into()], &cmds);
    let unlimited = run_guest(&["--rng".into()], &cmds);

    // Assert: the guest's own timing of the read (ms=), in a generous band.
    let ms = |run: &StreamedRun| {
        let line = &run.all("OK rng").nth(1).expect("second rng answer").text;
        assert_eq!(num(line, "bytes"), 131072, "{line}");
        num(line, "ms")
    };
    let (limited_ms, unlimited_ms) = (ms(&limited), ms(&unlimited));
    eprintln!("rng bw=64K: 128 KiB in {limited_ms} ms; unlimited {unlimited_ms} ms");
    assert!(
        (1000..=4000).contains(&limited_ms),
        "128 KiB at 64 KiB/s should take about 2000 ms, took {limited_ms}"
    );
    assert!(
        unlimited_ms * 2 < limited_ms,
        "unlimited ({unlimited_ms} ms) is not clearly faster"
    );
}
