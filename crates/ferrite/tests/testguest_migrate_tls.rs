//! Live migration over TLS with mutual certificates: a `ferrite run` source migrates its
//! running guest to a `ferrite run --incoming ... --incoming-tls-cert/-key/-ca` destination
//! (`{"op":"migrate","tls_cert":...,"tls_key":...,"tls_ca":...}` on the source's control
//! socket). The stream on the wire is TLS; a source with a certificate from another CA, or
//! without TLS, is refused in the handshake: the source keeps running its guest and the
//! destination exits without ever running it. Bad TLS files are refused before anything
//! starts.

mod common;
mod testguest_common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use testguest_common::control::Vm;
use testguest_common::migrate::*;
use testguest_common::{num, WATCHDOG};

/// Exit status of a source whose guest was migrated away.
/// Exit status of a destination that refused or lost the migration.
const USAGE: i32 = 2;

/// Certificates made with the `openssl` CLI in a scratch directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA `ca`, a destination certificate `dst` for 127.0.0.1 and a source certificate
    /// `src`, both signed by it.
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferrite-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.ca("ca");
        pki.leaf("dst", "ca", "IP:127.0.0.1");
        pki.leaf("src", "ca", "DNS:source.example");
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn new_key(&self, name: &str, extra: &[&str], out: &str) {
        let (key, subj) = (format!("{name}.key"), format!("/CN={name}"));
        let mut args = vec!["req"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            out,
            "-subj",
            &subj,
        ]);
        self.openssl(&args);
    }

    /// A self-signed CA `NAME.pem` / `NAME.key`.
    fn ca(&self, name: &str) {
        self.new_key(name, &["-x509", "-days", "2"], &format!("{name}.pem"));
    }

    /// `NAME.pem` / `NAME.key` signed by the CA `ca`, for the subject alternative names `san`.
    fn leaf(&self, name: &str, ca: &str, san: &str) {
        let (csr, ext, pem) = (
            format!("{name}.csr"),
            format!("{name}.ext"),
            format!("{name}.pem"),
        );
        self.new_key(name, &[], &csr);
        std::fs::write(self.dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// `ferrite run` flags of a TLS destination presenting `dst`, trusting `ca`.
    fn incoming_flags(&self) -> Vec<String> {
        vec![
            "--incoming-tls-cert".into(),
            self.path("dst.pem"),
            "--incoming-tls-key".into(),
            self.path("dst.key"),
            "--incoming-tls-ca".into(),
            self.path("ca.pem"),
        ]
    }

    /// The `migrate` request's TLS fields for the source certificate `leaf`.
    fn migrate_fields(&self, leaf: &str, request: &mut Value) {
        request["tls_cert"] = self.path(&format!("{leaf}.pem")).into();
        request["tls_key"] = self.path(&format!("{leaf}.key")).into();
        request["tls_ca"] = self.path("ca.pem").into();
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A one-connection TCP proxy in front of `target` that records what the source sends;
/// returns its endpoint and the recording.
fn recording_proxy(target: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp:{}", listener.local_addr().expect("addr"));
    let target = target.trim_start_matches("tcp:").to_string();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        let (src, _) = listener.accept().expect("accept");
        let deadline = Instant::now() + Duration::from_secs(10);
        let dst = loop {
            match TcpStream::connect(&target) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("proxy cannot reach {target}: {e}"),
            }
        };
        let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let forward = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = src_r.read(&mut buf) {
                rec.lock().unwrap().extend_from_slice(&buf[..n]);
                if dst_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = dst_w.shutdown(Shutdown::Write);
        });
        let (mut dst_r, mut src_w) = (dst, src);
        let _ = std::io::copy(&mut dst_r, &mut src_w);
        let _ = src_w.shutdown(Shutdown::Write);
        let _ = forward.join();
    });
    (endpoint, recorded)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn test_guest_migrates_over_mutual_tls_and_keeps_counting_with_its_memory_intact() {
    // Arrange: a guest dirtying 8 MiB at 2000 pages/s; a TLS destination behind a proxy that
    // records the wire.
    let pki = Pki::new("ok");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("tls-ok", "dirty 8 2000 100");
    let before = src.wait_line("tick n=3 ");
    let mut dst = start_destination_with("tls-ok-d", &endpoint, &pki.incoming_flags());
    let (proxy, wire) = recording_proxy(&endpoint);
    let mut request = serde_json::json!({"to": proxy});
    pki.migrate_fields("src", &mut request);

    // Act
    let reply = request_migrate(&mut src, request);
    let (status, _) = wait_migration(&mut src);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    let first = dst.wait_line("tick ");
    let later = dst.wait_line(&format!("tick n={} ", num(&first, "n") + 3));
    dst.send("x");
    let stopped = dst.wait_line("OK dirty stopped");
    dst.send("dirty-check");
    let check = dst.wait_any(&["OK dirty-check", "ERR dirty-check"]);
    let wire = wire.lock().unwrap().clone();

    // Assert: handed over, continued from its own values, memory verified.
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(src_exit.code(), Some(MIGRATED), "{status} {src_err}");
    assert!(src_err.contains("migrated to tcp:"), "{src_err}");
    assert!(num(&first, "n") > num(&before, "n"), "{before} / {first}");
    assert!(
        num(&first, "value") > num(&before, "value"),
        "{before} / {first}"
    );
    assert!(
        num(&later, "value") > num(&first, "value"),
        "{first} / {later}"
    );
    assert!(
        num(&stopped, "dirtied") > num(&before, "dirtied"),
        "{stopped}"
    );
    assert!(check.starts_with("OK dirty-check"), "{check}");
    // The wire carried TLS records only: no stream magic, no hello in clear.
    assert!(wire.len() > 1 << 20, "{} bytes on the wire", wire.len());
    assert_eq!(&wire[..2], &[0x16, 0x03], "a TLS handshake record first");
    assert!(!contains(&wire, b"FERRMIG"), "the stream went out in clear");
    assert!(
        !contains(&wire, b"ferrite_version"),
        "the hello went out in clear"
    );
}

#[test]
fn test_source_certificate_from_another_ca_is_refused_and_the_source_keeps_running() {
    // Arrange: the source's certificate is signed by a CA the destination does not trust.
    let pki = Pki::new("rogue");
    pki.ca("rogue");
    pki.leaf("intruder", "rogue", "DNS:source.example");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("tls-rogue", "dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination_with("tls-rogue-d", &endpoint, &pki.incoming_flags());
    let mut request = serde_json::json!({"to": endpoint});
    pki.migrate_fields("intruder", &mut request);

    // Act
    let reply = request_migrate(&mut src, request);
    let (status, _) = wait_migration(&mut src);

    // Assert: refused in the handshake on both sides; the guest runs on at the source only.
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(status["phase"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or("");
    assert!(
        error.contains("refused this source's certificate"),
        "{status}"
    );
    assert!(error.contains("--incoming-tls-ca"), "{status}");
    assert_source_runs_on(&mut src);
    let (dst_code, dst_err) = assert_never_ran(&mut dst);
    assert_eq!(dst_code, Some(USAGE), "{dst_err}");
    assert!(
        dst_err.contains("Refused the source's certificate"),
        "{dst_err}"
    );
}

#[test]
fn test_plaintext_source_to_a_tls_destination_fails_cleanly() {
    // Arrange
    let pki = Pki::new("plain");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("tls-plain", "dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination_with("tls-plain-d", &endpoint, &pki.incoming_flags());

    // Act: no TLS fields.
    let reply = request_migrate(&mut src, serde_json::json!({"to": endpoint}));
    let (status, _) = wait_migration(&mut src);

    // Assert: the destination says it wants TLS; nothing ran there.
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(status["phase"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or("");
    assert!(error.contains("only TLS migrations"), "{status}");
    assert!(error.contains("tls_cert"), "{status}");
    assert_source_runs_on(&mut src);
    let (dst_code, dst_err) = assert_never_ran(&mut dst);
    assert_eq!(dst_code, Some(USAGE), "{dst_err}");
    assert!(dst_err.contains("without TLS"), "{dst_err}");
}

#[test]
fn test_bad_tls_files_are_refused_before_anything_starts() {
    // Arrange
    let pki = Pki::new("files");
    std::fs::write(pki.dir.join("empty.pem"), "").unwrap();
    let mut src = Vm::start("tls-files", "dirty 4 500 100");
    src.wait_line("tick n=1 ");
    let mut missing = serde_json::json!({"to": free_tcp_endpoint()});
    pki.migrate_fields("src", &mut missing);
    missing["tls_cert"] = pki.path("nope.pem").into();
    let mut partial = serde_json::json!({"to": free_tcp_endpoint()});
    pki.migrate_fields("src", &mut partial);
    partial.as_object_mut().unwrap().remove("tls_key");
    let run = |extra: &[String]| {
        let out = std::process::Command::new(common::ferrite_bin())
            .args(["run", "--incoming", &free_tcp_endpoint()])
            .args(extra)
            .output()
            .expect("run ferrite");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut empty_ca = pki.incoming_flags();
    empty_ca[5] = pki.path("empty.pem");

    // Act
    let missing = request_migrate(&mut src, missing);
    let partial = request_migrate(&mut src, partial);
    let status = src.request(r#"{"op":"migrate-status"}"#);
    let (ca_code, ca_err) = run(&empty_ca);
    let (half_code, half_err) = run(&pki.incoming_flags()[..2]);

    // Assert: the migrate replies name the file or the missing field; nothing started.
    assert_eq!(missing["error"], "bad-request", "{missing}");
    let text = missing["message"].as_str().unwrap_or("");
    assert!(
        text.contains("nope.pem") && text.contains("PEM"),
        "{missing}"
    );
    assert_eq!(partial["error"], "bad-request", "{partial}");
    assert!(
        partial["message"]
            .as_str()
            .is_some_and(|m| m.contains("tls_key is missing")),
        "{partial}"
    );
    assert_eq!(status["migration"]["phase"], "none", "{status}");
    // The destination checks its files before listening, and wants all three.
    assert_eq!(ca_code, Some(USAGE), "{ca_err}");
    assert!(
        ca_err.contains("empty.pem") && ca_err.contains("holds no certificate"),
        "{ca_err}"
    );
    assert_eq!(half_code, Some(USAGE), "{half_err}");
    assert!(half_err.contains("--incoming-tls-key"), "{half_err}");
    assert_source_runs_on(&mut src);
}

#[test]
fn test_cancel_cuts_a_tls_migration_and_the_source_keeps_running() {
    // Arrange: enough memory to copy slowly (32 MiB at 4 MiB/s) over TLS.
    let pki = Pki::new("cancel");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("tls-cancel", "mem-fill 3 32;dirty 4 500 100");
    src.wait_line("tick n=2 ");
    let mut dst = start_destination_with("tls-cancel-d", &endpoint, &pki.incoming_flags());
    let mut request = serde_json::json!({"to": endpoint, "bandwidth_mib_s": 4});
    pki.migrate_fields("src", &mut request);
    let reply = request_migrate(&mut src, request);
    let deadline = Instant::now() + WATCHDOG;
    while status_once(&src.sock).is_none_or(|s| s["migration"]["phase"] != "copying") {
        assert!(Instant::now() < deadline, "the copy never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));

    // Act
    let cancel = src.request(r#"{"op":"migrate-cancel"}"#);
    let (status, _) = wait_migration(&mut src);

    // Assert
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(cancel["ok"], true, "{cancel}");
    assert_eq!(status["phase"], "cancelled", "{status}");
    assert_source_runs_on(&mut src);
    assert_never_ran(&mut dst);
}

#[test]
fn test_parallel_round_zero_over_tls_delivers_every_page() {
    // Arrange: 48 MiB of pattern, three TLS connections for round 0.
    let pki = Pki::new("par");
    let endpoint = free_tcp_endpoint();
    let mut src = Vm::start("tls-par", "mem-fill 17 48;dirty 4 1000 100");
    src.wait_line("tick n=3 ");
    let mut dst = start_destination_with("tls-par-d", &endpoint, &pki.incoming_flags());
    let mut request = serde_json::json!({"to": endpoint, "connections": 3});
    pki.migrate_fields("src", &mut request);

    // Act
    let reply = request_migrate(&mut src, request);
    let src_exit = src.wait_exit(WATCHDOG);
    let src_err = stderr_of(&mut src);
    dst.wait_line("tick ");
    dst.send("x");
    dst.wait_line("OK dirty stopped");
    dst.send("mem-check 17 48");
    let check = dst.wait_any(&["OK mem-check", "ERR mem-check"]);

    // Assert: only the 4 MiB the dirtying rewrote differ from the pattern.
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(src_exit.code(), Some(MIGRATED), "{src_err}");
    assert!(src_err.contains("over TLS"), "{src_err}");
    assert!(
        check.contains("first_bad=0x1000000 bad_words=524288 "),
        "{check}"
    );
}
