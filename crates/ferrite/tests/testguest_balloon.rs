//! virtio-balloon end to end: the test guest touches memory, the host raises the balloon
//! target over the control socket, the guest inflates and the VMM's resident set shrinks by
//! about as much; deflating and touching again brings it back; the guest's statistics reach
//! `balloon-status`; free page reporting and deflate-on-OOM give memory back too; bad targets
//! and a VM without a balloon get clear errors.

mod common;
mod testguest_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use testguest_common::{num, READY, WATCHDOG};

/// Lower bound of the RSS change for 128 MiB given back or taken again (the band is
/// generous: page tables, allocator caches and THP rounding move RSS by a few MiB).
const BAND_128_MIB: i64 = 96;

/// A running `ferrite run` with the test guest, driven over its console and control socket.
struct LiveGuest {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    sock: PathBuf,
    conn: Option<BufReader<UnixStream>>,
}

impl LiveGuest {
    fn start(name: &str, memory: &str, balloon: Option<&str>) -> Self {
        common::require_kvm();
        let sock = std::env::temp_dir().join(format!(
            "ferrite-balloon-{name}-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(common::ferrite_bin());
        cmd.args(["run", "--kernel"])
            .arg(common::asset("testguest.elf"))
            .args(["--memory", memory, "--api-socket"])
            .arg(&sock);
        if let Some(spec) = balloon {
            cmd.arg(format!("--balloon={spec}"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferrite");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.trim_end_matches('\r').to_string());
            }
        });
        let mut g = Self {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            sock,
            conn: None,
        };
        g.wait_for(READY);
        g
    }

    /// Waits for a line starting with `prefix`; a FATAL/PANIC or the watchdog fails the test.
    fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            let Ok(line) = self.lines.recv_timeout(WATCHDOG) else {
                panic!(
                    "no {prefix:?} from the guest; console:\n{}",
                    self.seen.join("\n")
                );
            };
            self.seen.push(line.clone());
            assert!(
                !line.contains("FATAL") && !line.contains("PANIC"),
                "guest crashed:\n{}",
                self.seen.join("\n")
            );
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Sends a console command and returns its final answer, which must be OK.
    fn ok(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let name = cmd.split_whitespace().next().unwrap();
        let answer = loop {
            let line = self.wait_for("");
            if line.starts_with(&format!("OK {name}")) || line.starts_with(&format!("ERR {name}")) {
                break line;
            }
        };
        assert!(answer.starts_with("OK"), "{cmd}: {answer}");
        answer
    }

    fn request(&mut self, line: &str) -> Value {
        let sock = self.sock.clone();
        let conn = self
            .conn
            .get_or_insert_with(|| BufReader::new(UnixStream::connect(&sock).expect("connect")));
        conn.get_mut().write_all(line.as_bytes()).unwrap();
        conn.get_mut().write_all(b"\n").unwrap();
        let mut reply = String::new();
        conn.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    fn set_target(&mut self, mib: u64) -> Value {
        self.request(&format!(r#"{{"op":"balloon-set","target_mib":{mib}}}"#))
    }

    fn status(&mut self) -> Value {
        self.request(r#"{"op":"balloon-status"}"#)
    }

    /// The VMM process's resident set in MiB (VmRSS).
    fn rss_mib(&self) -> i64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib / 1024
    }

    fn poweroff(mut self) {
        writeln!(self.stdin, "poweroff").unwrap();
        self.wait_for("OK poweroff");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "ferrite exited with {status}");
    }
}

impl Drop for LiveGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

#[test]
fn test_balloon_inflate_returns_memory_deflate_gives_it_back_and_stats_arrive() {
    let mut g = LiveGuest::start("inflate", "512M", Some(""));
    let ram_bytes = num(&g.ok("mem"), "ram_bytes");
    g.ok("balloon");
    g.ok("touch 256");
    let rss_touched = g.rss_mib();

    let set = g.set_target(128);
    g.ok("balloon-wait 128");
    let inflated = g.status();
    let rss_inflated = g.rss_mib();
    g.set_target(0);
    g.ok("balloon-wait 0");
    let deflated = g.status();
    g.ok("touch 256");
    let rss_retouched = g.rss_mib();
    let status = g.status();
    g.poweroff();

    eprintln!(
        "RSS MiB: touched {rss_touched}, inflated {rss_inflated}, re-touched {rss_retouched}"
    );
    assert_eq!(set["ok"], true, "{set}");
    assert_eq!(inflated["balloon"]["actual_mib"], 128, "{inflated}");
    assert_eq!(inflated["balloon"]["target_mib"], 128, "{inflated}");
    assert!(
        rss_touched - rss_inflated >= BAND_128_MIB,
        "inflating 128 MiB: RSS {rss_touched} -> {rss_inflated} MiB"
    );
    assert_eq!(deflated["balloon"]["actual_mib"], 0, "{deflated}");
    assert!(
        rss_retouched - rss_inflated >= BAND_128_MIB,
        "deflating and touching 128 MiB again: RSS {rss_inflated} -> {rss_retouched} MiB"
    );
    let b = &status["balloon"];
    assert_eq!(b["stats"]["total_memory"], ram_bytes, "{status}");
    assert!(b["stats"]["free_memory"].as_u64().unwrap() > 0, "{status}");
    assert!(b["stats_age_ms"].is_u64(), "{status}");
    assert_eq!(b["counters"]["inflated_pages"], 128 * 256, "{status}");
    assert_eq!(b["counters"]["deflated_pages"], 128 * 256, "{status}");
    assert_eq!(b["counters"]["released_bytes"], 128u64 << 20, "{status}");
    assert_eq!(b["counters"]["invalid_ranges"], 0, "{status}");
}

#[test]
fn test_balloon_free_page_reporting_returns_memory() {
    let mut g = LiveGuest::start("report", "512M", Some("stats=off"));
    g.ok("balloon");
    g.ok("touch 256");
    let rss_touched = g.rss_mib();

    let answer = g.ok("balloon-report 128");
    let rss_reported = g.rss_mib();
    let status = g.status();
    g.poweroff();

    eprintln!("RSS MiB: touched {rss_touched}, reported {rss_reported}");
    assert!(num(&answer, "ranges") >= 64, "{answer}");
    assert!(
        rss_touched - rss_reported >= BAND_128_MIB,
        "reporting 128 MiB free: RSS {rss_touched} -> {rss_reported} MiB"
    );
    let c = &status["balloon"]["counters"];
    assert_eq!(c["reported_bytes"], 128u64 << 20, "{status}");
    assert_eq!(c["released_bytes"], 128u64 << 20, "{status}");
    assert_eq!(status["balloon"]["features"]["stats"], false, "{status}");
    assert!(status["balloon"]["stats"].is_null(), "{status}");
}

#[test]
fn test_balloon_guest_short_of_memory_deflates_on_oom() {
    let mut g = LiveGuest::start("oom", "512M", Some("deflate-on-oom=on"));
    g.ok("balloon");
    g.set_target(256);
    g.ok("balloon-wait 256");

    let touch = g.ok("touch 400");
    let status = g.status();
    g.poweroff();

    assert!(num(&touch, "oom_deflated_mib") > 0, "{touch}");
    assert_eq!(status["balloon"]["target_mib"], 256, "{status}");
    assert!(
        status["balloon"]["actual_mib"].as_u64().unwrap() < 256,
        "{status}"
    );
}

#[test]
fn test_balloon_without_deflate_on_oom_guest_reports_out_of_memory() {
    let mut g = LiveGuest::start("nooom", "512M", Some("deflate-on-oom=off"));
    g.ok("balloon");
    g.set_target(256);
    g.ok("balloon-wait 256");

    writeln!(g.stdin, "touch 400").unwrap();
    let answer = g.wait_for("ERR touch");
    let status = g.status();
    g.poweroff();

    assert!(answer.contains("out-of-memory"), "{answer}");
    assert_eq!(status["balloon"]["actual_mib"], 256, "{status}");
}

#[test]
fn test_balloon_target_survives_guest_reboot_and_is_reached_again() {
    let mut g = LiveGuest::start("reboot", "256M", Some(""));
    g.set_target(64);
    g.ok("balloon-wait 64");

    writeln!(g.stdin, "reboot").unwrap();
    g.wait_for("OK reboot");
    g.wait_for(READY);
    let after_reboot = g.status();
    g.ok("balloon-wait 64");
    let again = g.status();
    g.poweroff();

    assert_eq!(after_reboot["balloon"]["target_mib"], 64, "{after_reboot}");
    assert_eq!(after_reboot["balloon"]["actual_mib"], 0, "{after_reboot}");
    assert_eq!(again["balloon"]["actual_mib"], 64, "{again}");
    assert_eq!(
        again["balloon"]["counters"]["inflated_pages"],
        2 * 64 * 256,
        "{again}"
    );
}

#[test]
fn test_balloon_target_above_guest_memory_is_refused() {
    let mut g = LiveGuest::start("refuse", "256M", Some(""));

    let refused = g.set_target(300);
    let status = g.status();
    g.poweroff();

    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"], "bad-request", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("larger than the guest's 256 MiB"),
        "{message}"
    );
    assert_eq!(status["balloon"]["target_mib"], 0, "{status}");
}

#[test]
fn test_balloon_status_without_balloon_is_not_supported() {
    let mut g = LiveGuest::start("none", "128M", None);

    let status = g.status();
    let set = g.set_target(1);
    g.poweroff();

    assert_eq!(status["error"], "not-supported", "{status}");
    assert_eq!(set["error"], "not-supported", "{set}");
}

#[test]
fn test_balloon_size_above_memory_is_a_usage_error() {
    let kernel = common::asset("testguest.elf");
    let kernel = kernel.to_str().unwrap();

    let out = common::run_ferrite(
        &[
            "run",
            "--kernel",
            kernel,
            "--memory",
            "128M",
            "--balloon",
            "size=1G",
        ],
        Duration::from_secs(60),
    );

    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--balloon"), "{}", out.stderr);
    assert!(out.stderr.contains("128 MiB"), "{}", out.stderr);
}
