//! Every route `ferrited` serves, as (method, path template) pairs. The daemon's router and
//! the OpenAPI document are both checked against this list by tests.

/// (HTTP method, path with `{name}` placeholders).
pub const ALL: &[(&str, &str)] = &[
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/v1/host"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/events"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("PATCH", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"),
    ("POST", "/v1/vms/{name}/kill"),
    ("POST", "/v1/vms/{name}/pause"),
    ("POST", "/v1/vms/{name}/resume"),
    ("POST", "/v1/vms/{name}/reboot"),
    ("GET", "/v1/vms/{name}/stats"),
    ("GET", "/v1/vms/{name}/console"),
    ("GET", "/v1/vms/{name}/console/log"),
    ("GET", "/v1/vms/{name}/snapshots"),
    ("POST", "/v1/vms/{name}/snapshots"),
    ("DELETE", "/v1/vms/{name}/snapshots/{snapshot}"),
    ("POST", "/v1/vms/{name}/snapshots/{snapshot}/restore"),
    ("POST", "/v1/vms/{name}/snapshots/{snapshot}/clone"),
    ("GET", "/v1/vms/{name}/disk-snapshots"),
    ("POST", "/v1/vms/{name}/disk-snapshots"),
    ("POST", "/v1/vms/{name}/disk-snapshots/{tag}/revert"),
    ("POST", "/v1/vms/{name}/disks/{disk}/flatten"),
    ("POST", "/v1/vms/{name}/migrate"),
    ("POST", "/v1/vms/{name}/migrate/cancel"),
    ("GET", "/v1/vms/{name}/migration"),
    ("POST", "/v1/migrations/incoming"),
    ("DELETE", "/v1/migrations/incoming/{name}"),
];

/// Path of a VM's resource.
pub fn vm(name: &str) -> String {
    format!("/v1/vms/{name}")
}

/// Path of a VM action (`start`, `stop`, ...).
pub fn vm_action(name: &str, action: &str) -> String {
    format!("/v1/vms/{name}/{action}")
}

/// Path of a VM's snapshot collection.
pub fn snapshots(vm: &str) -> String {
    format!("/v1/vms/{vm}/snapshots")
}

/// Path of one snapshot of a VM.
pub fn snapshot(vm: &str, name: &str) -> String {
    format!("/v1/vms/{vm}/snapshots/{name}")
}

/// Path of a VM's disk snapshot collection.
pub fn disk_snapshots(vm: &str) -> String {
    format!("/v1/vms/{vm}/disk-snapshots")
}

/// Path of the revert action of disk snapshot `tag` of a VM.
pub fn disk_snapshot_revert(vm: &str, tag: &str) -> String {
    format!("/v1/vms/{vm}/disk-snapshots/{tag}/revert")
}

/// Path of the flatten action of disk `disk` (its index) of a VM.
pub fn disk_flatten(vm: &str, disk: usize) -> String {
    format!("/v1/vms/{vm}/disks/{disk}/flatten")
}

/// Where a destination daemon takes incoming migrations.
pub const INCOMING_MIGRATIONS: &str = "/v1/migrations/incoming";

/// Path of an incoming migration (a reservation) of VM `name`.
pub fn incoming_migration(name: &str) -> String {
    format!("{INCOMING_MIGRATIONS}/{name}")
}
