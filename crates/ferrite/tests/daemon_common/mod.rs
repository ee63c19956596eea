//! A real `ferrited` for tests: its own state/run directories and socket under a fresh
//! temporary directory, the real `ferrite` binary as its VMM and as its CLI, raw HTTP through
//! `curl --unix-socket`. Dropping it kills the daemon, every VMM it started and their cgroups.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;

pub mod wire;

/// The `ferrited` binary built for this test run.
pub fn ferrited_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrited"))
}

/// A daemon under test.
pub struct TestDaemon {
    /// Temporary root (state, run, socket).
    pub root: PathBuf,
    /// API socket.
    pub socket: PathBuf,
    /// The cgroup parent name this daemon uses.
    pub cgroup_parent: String,
    /// Extra daemon flags (kept for restarts).
    pub extra: Vec<String>,
    child: Option<Child>,
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl TestDaemon {
    /// Start a daemon with `extra` flags and wait until its socket answers.
    pub fn start(extra: &[&str]) -> Self {
        common::require_kvm();
        let id = unique("fd");
        let root = PathBuf::from("/tmp").join(&id);
        std::fs::create_dir_all(&root).unwrap();
        let mut d = TestDaemon {
            socket: root.join("api.sock"),
            root,
            cgroup_parent: format!("ferrite-test-{id}"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        d.spawn();
        d
    }

    /// (Re)start the daemon process on the same directories.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("ferrited.log"))
            .unwrap();
        let child = Command::new(ferrited_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .arg("--run-dir")
            .arg(self.root.join("run"))
            .arg("--vmm-binary")
            .arg(common::ferrite_bin())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra)
            .env("FERRITE_ASSETS", common::assets_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run ferrited");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.try_api("GET", "/v1/host", None).map(|(s, _)| s) == Some(200) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "ferrited exited at start ({status}):\n{}",
                        self.daemon_log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "ferrited did not answer within 30 s:\n{}",
            self.daemon_log()
        );
    }

    /// SIGKILL the daemon only (its VMs keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's own log.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root.join("ferrited.log")).unwrap_or_default()
    }

    /// The console log of VM `name`.
    pub fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(
            self.root
                .join("state/logs")
                .join(format!("{name}.console.log")),
        )
        .unwrap_or_default()
    }

    /// The VMM log of VM `name`.
    pub fn vmm_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join("state/logs").join(format!("{name}.vmm.log")))
            .unwrap_or_default()
    }

    fn try_api(&self, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
        let (status, text) = self.raw(method, path, body.map(|b| b.to_string()).as_deref())?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some((status, value))
    }

    /// One HTTP request through curl; (status, body text).
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "120", "-X", method, "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://ferrited{path}"))
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = cmd.output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n')?;
        let code: u16 = code.trim().parse().ok()?;
        if code == 0 {
            return None;
        }
        Some((code, body.to_string()))
    }

    /// One API request; panics if the daemon does not answer.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_api(method, path, body.as_ref())
            .unwrap_or_else(|| panic!("no answer to {method} {path}:\n{}", self.daemon_log()))
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(common::ferrite_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferrite")
    }

    /// Run the CLI, require success, return stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "ferrite {args:?} failed: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `GET /v1/vms/{name}`.
    pub fn vm(&self, name: &str) -> Value {
        let (status, v) = self.api("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// The state of VM `name`.
    pub fn state(&self, name: &str) -> String {
        self.vm(name)["state"].as_str().unwrap_or("").to_string()
    }

    /// Wait until `f()` holds (panics with `what` and the daemon log after `timeout`).
    pub fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}:\n{}", self.daemon_log());
    }

    /// Wait until VM `name`'s console log contains `text`.
    pub fn wait_console(&self, name: &str, text: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.console_log(name).contains(text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "VM {name} never printed {text:?}; console:\n{}\nvmm log:\n{}\ndaemon log:\n{}",
            self.console_log(name),
            self.vmm_log(name),
            self.daemon_log()
        );
    }

    /// Processes whose command line mentions this daemon's directory (its VMMs).
    pub fn vmm_pids(&self) -> Vec<u32> {
        // With the separator: the directory of daemon `x1` is a prefix of `x12`'s.
        let needle = format!("{}/", self.root.display());
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(&needle)
                && (cmd.contains("run\0--config")
                    || cmd.contains("run\0--restore")
                    || cmd.contains("run\0--incoming"))
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill_daemon();
        for pid in self.vmm_pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        remove_cgroups(&self.cgroup_parent);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Remove every cgroup directory named `parent` (and its children) under /sys/fs/cgroup.
fn remove_cgroups(parent: &str) {
    let out = Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "6",
            "-type",
            "d",
            "-name",
            parent,
        ])
        .output();
    let Ok(out) = out else { return };
    for dir in String::from_utf8_lossy(&out.stdout).lines() {
        let _ = Command::new("find")
            .args([dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
            .status();
    }
}

/// A VM definition running the project's test guest with `cmds` (empty: idle console that
/// powers off on the ACPI power button).
pub fn testguest_spec(name: &str, cmds: &[&str]) -> Value {
    let kernel = common::asset("testguest.elf");
    let cmdline = if cmds.is_empty() {
        String::new()
    } else {
        format!("cmds=\"{}\"", cmds.join(";"))
    };
    json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 128,
        "kernel": kernel.display().to_string(),
        "cmdline": cmdline,
    })
}

/// Create VM `spec` (201 required) and return its name.
pub fn create(d: &TestDaemon, spec: Value) -> String {
    let name = spec["name"].as_str().unwrap().to_string();
    let (status, body) = d.api("POST", "/v1/vms", Some(spec));
    assert_eq!(status, 201, "create {name}: {body}");
    name
}

/// Start VM `name` (200 required).
pub fn start(d: &TestDaemon, name: &str) {
    let (status, body) = d.api("POST", &format!("/v1/vms/{name}/start"), None);
    assert_eq!(
        status,
        200,
        "start {name}: {body}\nvmm log:\n{}",
        d.vmm_log(name)
    );
}

/// The path of a file under the daemon's root.
pub fn under(d: &TestDaemon, rel: &str) -> PathBuf {
    Path::new(&d.root).join(rel)
}

/// The kinds of the stored events of VM `vm`, read from the event stream for two seconds.
pub fn event_kinds(d: &TestDaemon, vm: &str) -> Vec<String> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-N", "-m", "2", "--unix-socket"])
        .arg(&d.socket)
        .arg("http://ferrited/v1/events?since=0")
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .filter(|ev| ev["vm"] == vm)
        .map(|ev| ev["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Run `openssl ARGS` in `dir` (must succeed).
pub fn openssl(args: &[&str], dir: &std::path::Path) {
    let st = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

/// `openssl req` for a new P-256 key `NAME.key` and `NAME.EXT` with subject CN=`cn`
/// (`extra`: `-x509 -days N` for a self-signed certificate instead of a request).
pub fn new_key_and_request(dir: &std::path::Path, name: &str, cn: &str, extra: &[&str], ext: &str) {
    let (key, out, subj) = (
        format!("{name}.key"),
        format!("{name}.{ext}"),
        format!("/CN={cn}"),
    );
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
        &out,
        "-subj",
        &subj,
    ]);
    openssl(&args, dir);
}

/// A CA (`ca.pem`, `ca.key`) and, per name, a key and certificate `NAME.key`/`NAME.pem` it
/// signed for `localhost` and 127.0.0.1 (usable as server and client certificates), in `dir`.
pub fn tls_certs(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    new_key_and_request(dir, "ca", "ferrite-ca", &["-x509", "-days", "2"], "pem");
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    for name in names {
        new_key_and_request(dir, name, name, &[], "csr");
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
            dir,
        );
    }
}
