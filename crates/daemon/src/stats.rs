//! Gathering one VM's statistics from its VMM (control socket), `/proc` and its cgroup.

use std::collections::BTreeMap;

use api::{IoCounters, VmStats};
use serde_json::{json, Value};

use crate::app::{now_ms, Daemon, VmSlot};
use crate::{procfs, vmm_link};

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Statistics of `slot`; a stopped VM has only its name, state and RAM.
pub async fn collect(daemon: &Daemon, slot: &VmSlot) -> VmStats {
    let rt = slot.runtime();
    let spec = slot.spec();
    let mut s = VmStats {
        name: slot.name.clone(),
        state: Some(rt.state),
        memory_bytes: spec.memory_mib << 20,
        ..Default::default()
    };
    let (true, Some(pid)) = (rt.state.is_active(), rt.pid) else {
        return s;
    };
    s.uptime_s = rt
        .started_ms
        .map(|t| now_ms().saturating_sub(t) as f64 / 1000.0)
        .unwrap_or(0.0);
    s.process_cpu_seconds = procfs::cpu_seconds(pid).unwrap_or(0.0);
    s.rss_bytes = procfs::rss_bytes(pid).unwrap_or(0);
    if let Some(cg) = daemon.cgroups.as_ref().and_then(|m| m.open(&slot.name)) {
        if let Ok(c) = cg.stats() {
            s.cpu_throttled_seconds = c.throttled_ns as f64 / 1e9;
        }
    }
    if let Ok(reply) = vmm_link::call(&slot.paths.control, &json!({"op": "stats"})).await {
        fill_from_vmm(&mut s, &reply);
    }
    s
}

/// Copy what the VMM's `stats` reply says into `s`.
pub fn fill_from_vmm(s: &mut VmStats, reply: &Value) {
    if let Some(vcpus) = reply.get("vcpus").and_then(Value::as_array) {
        let mut exits = BTreeMap::new();
        for v in vcpus {
            s.vcpu_seconds.push(u(v, "cpu_ns") as f64 / 1e9);
            if let Some(map) = v.get("exits").and_then(Value::as_object) {
                for (reason, n) in map {
                    *exits.entry(reason.clone()).or_insert(0) += n.as_u64().unwrap_or(0);
                }
            }
        }
        s.exits = exits;
    }
    if let Some(devices) = reply.get("devices").and_then(Value::as_object) {
        for (name, d) in devices {
            if name.starts_with("disk") {
                s.disks.insert(
                    name.clone(),
                    IoCounters {
                        read_bytes: u(d, "read_bytes"),
                        write_bytes: u(d, "write_bytes"),
                        read_ops: u(d, "reads"),
                        write_ops: u(d, "writes"),
                    },
                );
            } else if name.starts_with("net") && !name.contains('.') {
                s.nets.insert(
                    name.clone(),
                    IoCounters {
                        read_bytes: u(d, "rx_bytes"),
                        write_bytes: u(d, "tx_bytes"),
                        read_ops: u(d, "rx_packets"),
                        write_ops: u(d, "tx_packets"),
                    },
                );
            }
        }
    }
    if let Some(b) = reply.get("balloon").filter(|b| !b.is_null()) {
        s.balloon_bytes = Some(u(b, "actual_mib") << 20);
        s.balloon_target_bytes = Some(u(b, "target_mib") << 20);
        s.guest_free_bytes = b
            .get("stats")
            .and_then(|st| st.get("free_memory"))
            .and_then(Value::as_u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vmm_reply_fills_exits_devices_and_balloon() {
        let reply = json!({
            "ok": true,
            "vcpus": [
                {"id": 0, "cpu_ns": 2_000_000_000u64, "exits": {"io_out": 5, "hlt": 1}},
                {"id": 1, "cpu_ns": 1_000_000_000u64, "exits": {"io_out": 2}}
            ],
            "devices": {
                "disk0": {"read_bytes": 4096, "write_bytes": 512, "reads": 1, "writes": 1},
                "net0": {"rx_bytes": 100, "tx_bytes": 60, "rx_packets": 2, "tx_packets": 1},
                "rng": {"bytes": 3}
            },
            "balloon": {"actual_mib": 64, "target_mib": 64, "stats": {"free_memory": 1000}}
        });
        let mut s = VmStats::default();

        fill_from_vmm(&mut s, &reply);

        assert_eq!(s.vcpu_seconds, vec![2.0, 1.0]);
        assert_eq!(s.exits["io_out"], 7);
        assert_eq!(s.disks["disk0"].read_ops, 1);
        assert_eq!(s.nets["net0"].write_bytes, 60);
        assert_eq!(s.balloon_bytes, Some(64 << 20));
        assert_eq!(s.guest_free_bytes, Some(1000));
    }
}
