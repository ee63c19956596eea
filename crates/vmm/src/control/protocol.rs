//! Request parsing and dispatch; independent of the socket so it is unit-testable.

use rate_limiter::{RateLimitConfig, SharedRateLimiter};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Longest request line accepted; longer lines get a `too-large` error reply.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Reads a device's live counters as JSON (for `stats`); called on the control thread.
pub type StatsFn = Box<dyn Fn() -> Value + Send + Sync>;

/// What the control socket may ask of a balloon device. Implemented by the balloon's wiring
/// in `devices::balloon`; kept as a trait so the protocol does not depend on the device model.
pub trait BalloonControl: Send + Sync {
    /// Ask the guest to give back memory until the balloon holds `target_mib` MiB (0 deflates
    /// it completely). Returns the new status, or a message naming why the target is refused.
    fn set_target_mib(&self, target_mib: u64) -> Result<Value, String>;
    /// The balloon's target, actual size and the guest's latest memory statistics.
    fn status(&self) -> Value;
}

/// What the control socket may do to the running VM instance (implemented by the VM builder
/// for each instance it builds; kept as a trait so the protocol is unit-testable).
pub trait VmOps: Send {
    /// Park every vCPU and pause the device workers. Idempotent. `Err((code, message))` when
    /// the vCPUs did not park in time (`timeout`) or a device could not pause.
    fn pause(&self) -> Result<(), (&'static str, String)>;
    /// Let the vCPUs and device workers run again. Idempotent.
    fn resume(&self) -> Result<(), (&'static str, String)>;
    /// Whether [`VmOps::pause`] is in effect.
    fn paused(&self) -> bool;
    /// Press the ACPI power button; returns whether the guest enabled the power-button event.
    fn power_button(&self) -> bool;
    /// Reset the VM (rebuilt in process unless `--no-reboot`).
    fn reboot(&self);
    /// Per-vCPU statistics (`id`, `tid`, `cpu_ns`, `exits`).
    fn vcpus(&self) -> Value;
    /// Pause, write a snapshot to the new directory `path`, and resume unless `stay_paused`
    /// (or the VM was paused before). Returns the reply (`snapshot`: what was written).
    /// With `diff`, only the pages written since the previous snapshot go into the memory
    /// file (needs dirty-page tracking).
    fn snapshot(
        &self,
        path: &std::path::Path,
        stay_paused: bool,
        diff: bool,
    ) -> Result<Value, (&'static str, String)>;
    /// Pause, put a new qcow2 overlay tagged `tag` over every writable disk at one point
    /// (all disks or none), and resume unless the VM was paused before. Returns the reply
    /// (`disks`: each new top image and its backing file).
    fn disk_snapshot(&self, tag: &str) -> Result<Value, (&'static str, String)>;
    /// Start migrating the VM to a `ferrite run --incoming` destination, on its own thread;
    /// progress is read with `migrate-status`.
    fn migrate(
        &self,
        opts: crate::migrate::MigrateOptions,
    ) -> Result<Value, (&'static str, String)> {
        let _ = opts;
        Err(("not-supported", "This VM cannot be migrated".to_string()))
    }
    /// Cancel the migration in progress (the VM keeps running here).
    fn migrate_cancel(&self) -> Result<Value, (&'static str, String)> {
        Err(("bad-request", "No migration is in progress".to_string()))
    }
}

/// The running VM instance: filled after each build, emptied before teardown.
pub type LiveSlot = Arc<Mutex<Option<Box<dyn VmOps>>>>;

/// What the control socket can reach: named rate limiters (`disk0`, `net0.rx`, `rng`), the
/// devices' counters, the balloon, and the VM's configuration for `info`.
pub struct ControlState {
    /// Limiters by device name.
    pub limiters: BTreeMap<String, SharedRateLimiter>,
    /// Counters by device name (`disk0`, `net0`, `vsock`, `rng`, `console`).
    pub device_stats: BTreeMap<String, StatsFn>,
    /// The balloon, when the VM has one.
    pub balloon: Option<std::sync::Arc<dyn BalloonControl>>,
    /// The configuration reported by `info`.
    pub info: Value,
    /// When the run started (for `uptime_ms`).
    pub started: Instant,
    /// The running VM instance, if one is up (empty while it is being rebuilt).
    pub live: LiveSlot,
    /// Guest resets turned into in-process rebuilds so far.
    pub reboots: Arc<AtomicU32>,
    /// The disks (for `info`'s current image paths and `disk-chain`).
    pub disks: Vec<crate::disk_snapshot::LiveDisk>,
    /// The current or last migration's progress.
    pub migration: crate::migrate::SharedStatus,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Info,
    Stats,
    RateLimit {
        device: String,
        #[serde(default)]
        direction: Option<String>,
        #[serde(default)]
        limit: Option<RateLimitConfig>,
        #[serde(default)]
        bytes_per_s: Option<u64>,
        #[serde(default)]
        ops_per_s: Option<u64>,
    },
    BalloonSet {
        target_mib: u64,
    },
    BalloonStatus,
    Pause,
    Resume,
    PowerButton,
    Reboot,
    Snapshot {
        path: String,
        #[serde(default)]
        stay_paused: bool,
        #[serde(default)]
        diff: bool,
    },
    DiskSnapshot {
        tag: String,
    },
    DiskChain,
    Migrate(crate::migrate::MigrateOptions),
    MigrateStatus,
    MigrateCancel,
}

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"ok": false, "error": code, "message": message.into()})
}

fn no_balloon() -> Value {
    error(
        "not-supported",
        "This VM has no balloon device: start it with --balloon",
    )
}

fn limits(state: &ControlState) -> Value {
    let map: BTreeMap<&String, RateLimitConfig> = state
        .limiters
        .iter()
        .map(|(k, v)| (k, v.config()))
        .collect();
    json!(map)
}

/// The configuration with each disk's current image (a disk snapshot moves it to an overlay).
fn info(state: &ControlState) -> Value {
    let mut info = state.info.clone();
    if let Some(disks) = info.get_mut("disks").and_then(Value::as_array_mut) {
        for (d, live) in disks.iter_mut().zip(&state.disks) {
            let cur = live.disk.current();
            d["path"] = json!(cur.path);
            d["format"] = json!(cur.format);
        }
    }
    info
}

/// Handles one request line and returns the reply line (without the newline).
pub fn handle_line(state: &ControlState, line: &str) -> String {
    let reply = if line.len() > MAX_REQUEST_BYTES {
        error("too-large", "Request longer than 64 KiB")
    } else {
        match serde_json::from_str::<Request>(line) {
            Err(e) if e.is_data() => error("bad-request", format!("Unknown op or bad fields: {e}")),
            Err(e) => error("bad-json", format!("Not a JSON object: {e}")),
            Ok(req) => dispatch(state, req),
        }
    };
    reply.to_string()
}

fn busy() -> Value {
    error(
        "busy",
        "The VM is not running right now (starting, rebooting or stopping); try again",
    )
}

fn state_name(paused: bool) -> &'static str {
    if paused {
        "paused"
    } else {
        "running"
    }
}

/// Runs `f` on the live VM while holding the slot (teardown waits for it), or answers `busy`.
fn with_live(state: &ControlState, f: impl FnOnce(&dyn VmOps) -> Value) -> Value {
    let slot = state.live.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_deref() {
        Some(vm) => f(vm),
        None => busy(),
    }
}

fn vm_op(state: &ControlState, req: Request) -> Value {
    with_live(state, |vm| {
        let result = match req {
            Request::Pause => vm.pause().map(|()| json!({"ok": true, "state": "paused"})),
            Request::Resume => vm
                .resume()
                .map(|()| json!({"ok": true, "state": "running"})),
            Request::PowerButton => Ok(json!({"ok": true, "guest_enabled": vm.power_button()})),
            Request::Reboot => {
                vm.reboot();
                Ok(json!({"ok": true}))
            }
            Request::Snapshot {
                path,
                stay_paused,
                diff,
            } => vm.snapshot(std::path::Path::new(&path), stay_paused, diff),
            Request::DiskSnapshot { tag } => vm.disk_snapshot(&tag),
            Request::Migrate(opts) => vm.migrate(opts),
            Request::MigrateCancel => vm.migrate_cancel(),
            _ => Ok(error("bad-request", "Not a VM operation")),
        };
        result.unwrap_or_else(|(code, message)| error(code, message))
    })
}

fn dispatch(state: &ControlState, req: Request) -> Value {
    match req {
        Request::Info => json!({"ok": true, "config": info(state), "rate_limits": limits(state)}),
        Request::DiskChain => match crate::disk_snapshot::chains(&state.disks) {
            Ok(disks) => json!({"ok": true, "disks": disks}),
            Err((code, message)) => error(code, message),
        },
        Request::DiskSnapshot { .. }
        | Request::Pause
        | Request::Resume
        | Request::PowerButton
        | Request::Reboot
        | Request::Snapshot { .. }
        | Request::Migrate(_)
        | Request::MigrateCancel => vm_op(state, req),
        Request::MigrateStatus => {
            let status = state
                .migration
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json!({"ok": true, "migration": status})
        }
        Request::Stats => {
            let (run_state, vcpus) = {
                let slot = state.live.lock().unwrap_or_else(|e| e.into_inner());
                match slot.as_deref() {
                    Some(vm) => (state_name(vm.paused()), vm.vcpus()),
                    None => ("starting", json!([])),
                }
            };
            json!({
            "ok": true,
            "state": run_state,
            "reboots": state.reboots.load(Ordering::SeqCst),
            "vcpus": vcpus,
            "uptime_ms": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "rate_limits": limits(state),
            "devices": state
                .device_stats
                .iter()
                .map(|(name, read)| (name.clone(), read()))
                .collect::<serde_json::Map<String, Value>>(),
            "balloon": state.balloon.as_ref().map(|b| b.status()),
            })
        }
        Request::RateLimit {
            device,
            direction,
            limit,
            bytes_per_s,
            ops_per_s,
        } => {
            let name = match direction.as_deref() {
                None => device.clone(),
                Some(d @ ("rx" | "tx")) => format!("{device}.{d}"),
                Some(d) => return error("bad-request", format!("Direction {d:?}: use rx or tx")),
            };
            let Some(limiter) = state.limiters.get(&name) else {
                return error(
                    "unknown-device",
                    format!(
                        "No rate-limited device {name:?}; known: {:?}",
                        state.limiters.keys().collect::<Vec<_>>()
                    ),
                );
            };
            let cfg = match limit {
                Some(l) => l,
                None => RateLimitConfig {
                    bandwidth: bytes_per_s
                        .filter(|&n| n > 0)
                        .map(|n| RateLimitConfig::parse_rate(n, None)),
                    ops: ops_per_s
                        .filter(|&n| n > 0)
                        .map(|n| RateLimitConfig::parse_rate(n, None)),
                },
            };
            limiter.update(&cfg);
            json!({"ok": true, "device": name, "limit": limiter.config()})
        }
        Request::BalloonSet { target_mib } => match &state.balloon {
            None => no_balloon(),
            Some(b) => match b.set_target_mib(target_mib) {
                Ok(status) => json!({"ok": true, "balloon": status}),
                Err(message) => error("bad-request", message),
            },
        },
        Request::BalloonStatus => match &state.balloon {
            None => no_balloon(),
            Some(b) => json!({"ok": true, "balloon": b.status()}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ControlState {
        let mut limiters = BTreeMap::new();
        limiters.insert(
            "disk0".to_string(),
            SharedRateLimiter::new(&RateLimitConfig::default()).unwrap(),
        );
        let mut device_stats: BTreeMap<String, StatsFn> = BTreeMap::new();
        device_stats.insert("disk0".to_string(), Box::new(|| json!({"reads": 7})));
        ControlState {
            limiters,
            device_stats,
            balloon: None,
            info: json!({"vcpus": 1}),
            started: Instant::now(),
            live: LiveSlot::default(),
            reboots: Arc::default(),
            disks: Vec::new(),
            migration: Default::default(),
        }
    }

    fn reply(s: &ControlState, line: &str) -> Value {
        serde_json::from_str(&handle_line(s, line)).unwrap()
    }

    #[test]
    fn test_rate_limit_friendly_form_updates_limiter() {
        let s = state();

        let r = reply(
            &s,
            r#"{"op":"rate-limit","device":"disk0","bytes_per_s":1048576}"#,
        );

        assert_eq!(r["ok"], true);
        assert_eq!(
            s.limiters["disk0"].config().bandwidth.unwrap().size,
            1 << 20
        );
        assert_eq!(
            reply(&s, r#"{"op":"info"}"#)["rate_limits"]["disk0"]["bandwidth"]["size"],
            1 << 20
        );
    }

    #[test]
    fn test_rate_limit_full_form_updates_limiter() {
        let s = state();

        let r = reply(
            &s,
            r#"{"op":"rate-limit","device":"disk0","limit":{"bandwidth":null,"ops":{"size":10,"refill_time_ms":100}}}"#,
        );

        assert_eq!(r["ok"], true);
        assert_eq!(s.limiters["disk0"].config().ops.unwrap().size, 10);
    }

    #[test]
    fn test_migrate_status_reports_no_migration_and_bad_fields_are_refused() {
        let s = state();

        let status = reply(&s, r#"{"op":"migrate-status"}"#);
        let unknown = reply(&s, r#"{"op":"migrate","to":"tcp:h:1","speed":9}"#);
        let missing = reply(&s, r#"{"op":"migrate"}"#);

        assert_eq!(status["migration"]["phase"], "none", "{status}");
        assert_eq!(unknown["error"], "bad-request", "{unknown}");
        assert_eq!(missing["error"], "bad-request", "{missing}");
    }

    #[test]
    fn test_migrate_options_are_checked_before_anything_starts() {
        let opts =
            |json: &str| serde_json::from_str::<crate::migrate::MigrateOptions>(json).unwrap();

        let good = opts(r#"{"to":"tcp:10.0.0.2:7000"}"#).validate();
        let bad_to = opts(r#"{"to":"10.0.0.2:7000"}"#).validate().unwrap_err();
        let bad_budget = opts(r#"{"to":"unix:/m","downtime_ms":0}"#)
            .validate()
            .unwrap_err();

        assert!(good.is_ok());
        assert!(bad_to.contains("tcp:HOST:PORT"), "{bad_to}");
        assert!(bad_budget.contains("downtime_ms"), "{bad_budget}");
    }

    #[test]
    fn test_garbage_and_unknown_get_error_codes() {
        let s = state();

        assert_eq!(reply(&s, "garbage")["error"], "bad-json");
        assert_eq!(reply(&s, r#"{"op":"dance"}"#)["error"], "bad-request");
        assert_eq!(
            reply(&s, r#"{"op":"rate-limit","device":"disk9"}"#)["error"],
            "unknown-device"
        );
        assert_eq!(
            reply(&s, &"x".repeat(MAX_REQUEST_BYTES + 1))["error"],
            "too-large"
        );
        assert_eq!(
            reply(&s, r#"{"op":"balloon-status"}"#)["error"],
            "not-supported"
        );
    }

    #[test]
    fn test_stats_reports_uptime_and_device_counters() {
        let s = state();

        let r = reply(&s, r#"{"op":"stats"}"#);

        assert_eq!(r["ok"], true);
        assert!(r["uptime_ms"].is_u64());
        assert_eq!(r["devices"]["disk0"]["reads"], 7);
        assert!(r["balloon"].is_null());
    }

    struct FakeBalloon(std::sync::Mutex<u64>);

    impl BalloonControl for FakeBalloon {
        fn set_target_mib(&self, target_mib: u64) -> Result<Value, String> {
            if target_mib > 100 {
                return Err("Target 101 MiB or more is larger than the guest".to_string());
            }
            *self.0.lock().unwrap() = target_mib;
            Ok(self.status())
        }
        fn status(&self) -> Value {
            json!({"target_mib": *self.0.lock().unwrap()})
        }
    }

    #[test]
    fn test_balloon_ops_reach_the_balloon_and_report_refusals() {
        let mut s = state();
        s.balloon = Some(std::sync::Arc::new(FakeBalloon(std::sync::Mutex::new(0))));

        let set = reply(&s, r#"{"op":"balloon-set","target_mib":64}"#);
        let status = reply(&s, r#"{"op":"balloon-status"}"#);
        let refused = reply(&s, r#"{"op":"balloon-set","target_mib":500}"#);

        assert_eq!(set["balloon"]["target_mib"], 64);
        assert_eq!(status["balloon"]["target_mib"], 64);
        assert_eq!(refused["error"], "bad-request");
    }

    #[derive(Default)]
    struct FakeVm {
        paused: std::sync::atomic::AtomicBool,
        reboots: std::sync::atomic::AtomicU32,
    }

    impl VmOps for Arc<FakeVm> {
        fn pause(&self) -> Result<(), (&'static str, String)> {
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) -> Result<(), (&'static str, String)> {
            self.paused.store(false, Ordering::SeqCst);
            Ok(())
        }
        fn paused(&self) -> bool {
            self.paused.load(Ordering::SeqCst)
        }
        fn power_button(&self) -> bool {
            true
        }
        fn reboot(&self) {
            self.reboots.fetch_add(1, Ordering::SeqCst);
        }
        fn vcpus(&self) -> Value {
            json!([{"id": 0, "tid": 1, "cpu_ns": 2, "exits": {}}])
        }
        fn snapshot(
            &self,
            path: &std::path::Path,
            stay_paused: bool,
            diff: bool,
        ) -> Result<Value, (&'static str, String)> {
            Ok(json!({"ok": true, "path": path, "stay_paused": stay_paused, "diff": diff}))
        }
        fn disk_snapshot(&self, tag: &str) -> Result<Value, (&'static str, String)> {
            Ok(json!({"ok": true, "tag": tag}))
        }
    }

    #[test]
    fn test_vm_ops_are_busy_without_a_live_vm() {
        let s = state();

        for op in ["pause", "resume", "power-button", "reboot"] {
            let r = reply(&s, &format!(r#"{{"op":"{op}"}}"#));
            assert_eq!(r["error"], "busy", "{op}: {r}");
        }
        assert_eq!(reply(&s, r#"{"op":"stats"}"#)["vcpus"], json!([]));
    }

    #[test]
    fn test_vm_ops_reach_the_live_vm_and_stats_reports_state() {
        let s = state();
        let vm = Arc::new(FakeVm::default());
        *s.live.lock().unwrap() = Some(Box::new(vm.clone()));

        let paused = reply(&s, r#"{"op":"pause"}"#);
        let stats_paused = reply(&s, r#"{"op":"stats"}"#);
        let resumed = reply(&s, r#"{"op":"resume"}"#);
        let button = reply(&s, r#"{"op":"power-button"}"#);
        let reboot = reply(&s, r#"{"op":"reboot"}"#);
        let stats = reply(&s, r#"{"op":"stats"}"#);

        assert_eq!(paused, json!({"ok": true, "state": "paused"}));
        assert_eq!(stats_paused["state"], "paused");
        assert_eq!(resumed, json!({"ok": true, "state": "running"}));
        assert_eq!(button, json!({"ok": true, "guest_enabled": true}));
        assert_eq!(reboot, json!({"ok": true}));
        assert_eq!(vm.reboots.load(Ordering::SeqCst), 1);
        assert_eq!(stats["state"], "running");
        assert_eq!(stats["reboots"], 0);
        assert_eq!(stats["vcpus"][0]["tid"], 1);
    }

    #[test]
    fn test_disk_snapshot_reaches_the_live_vm_and_disk_chain_lists_no_disks() {
        let s = state();
        let busy = reply(&s, r#"{"op":"disk-snapshot","tag":"s1"}"#);
        *s.live.lock().unwrap() = Some(Box::new(Arc::new(FakeVm::default())));

        let taken = reply(&s, r#"{"op":"disk-snapshot","tag":"s1"}"#);
        let chains = reply(&s, r#"{"op":"disk-chain"}"#);

        assert_eq!(busy["error"], "busy", "{busy}");
        assert_eq!(taken, json!({"ok": true, "tag": "s1"}));
        assert_eq!(chains, json!({"ok": true, "disks": []}));
    }
}
