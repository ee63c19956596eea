//! Live migration between two daemons.
//!
//! Source (`POST /v1/vms/{name}/migrate`): the daemon reserves the VM's name at the destination
//! daemon (`POST /v1/migrations/incoming` there, see [`crate::peer`]), which starts a `ferrite
//! run --incoming tcp:ADDR:PORT` for it and answers with that endpoint; then it sends
//! `migrate` to the VM's VMM and follows `migrate-status` until the end (the record is
//! [`Outgoing`], served at `GET /v1/vms/{name}/migration`, in `/metrics` and as events). When
//! the guest runs on the destination the source VMM exits with the outcome `migrated` and the
//! daemon forgets the VM ([`Daemon::finish_outgoing_migration`]); on failure or cancel the VM
//! keeps running here and the destination drops its reservation.
//!
//! Destination: the reservation is a VM in state `incoming` whose VMM waits for the source;
//! it becomes `running` once that VMM's control socket answers (the guest runs here only after
//! the source's commit), and is forgotten again if the VMM exits before.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api::{
    ApiError, ErrorCode, IncomingMigration, IncomingMigrationRequest, MigrateRequest,
    MigrationInfo, MigrationPhase, VmState,
};
use serde_json::{json, Value};

use crate::app::{now_ms, Daemon, Runtime, StopIntent, VmSlot};
use crate::args::TlsIdentity;
use crate::error::{conflict, internal, store_error};
use crate::peer::Peer;
use crate::server::ViaTls;
use crate::stream_tls::{self, IncomingStream};
use crate::supervisor::{last_stderr_line, Launch};
use crate::{procfs, spec, vmm_link};

/// How often the source daemon reads its VMM's progress.
const POLL: Duration = Duration::from_millis(200);
/// How often the destination looks whether its incoming VM runs.
const INCOMING_POLL: Duration = Duration::from_millis(20);
/// How long an incoming VMM may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// Beyond the migration's time limit: the source's final copy and commit exchange.
const INCOMING_GRACE_S: u64 = 60;
/// How long a cancel waits for the VMM to report the migration over.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How long the source waits for its VMM's exit to be handled after it stopped answering.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The outgoing migration of one VM, as the daemon tracks it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Tells this migration from a later one of the same name.
    pub id: u64,
    /// What `GET /v1/vms/{name}/migration` shows.
    pub info: MigrationInfo,
}

/// `migrate-status`'s `migration` object (the VMM's `MigrationStatus`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct VmmStatus {
    phase: MigrationPhase,
    round: u32,
    remaining_bytes: u64,
    sent_bytes: u64,
    pages_sent: u64,
    zero_pages: u64,
    rate_bytes_per_s: u64,
    throttle_pct: u32,
    elapsed_ms: u64,
    downtime_ms: Option<f64>,
    total_ms: Option<f64>,
    error: Option<String>,
    tls: bool,
}

impl VmmStatus {
    fn parse(v: &Value) -> Option<VmmStatus> {
        serde_json::from_value(v.clone()).ok()
    }

    fn apply(&self, m: &mut MigrationInfo) {
        m.phase = self.phase;
        m.round = self.round;
        m.remaining_bytes = self.remaining_bytes;
        m.sent_bytes = self.sent_bytes;
        m.pages_sent = self.pages_sent;
        m.zero_pages = self.zero_pages;
        m.rate_bytes_per_s = self.rate_bytes_per_s;
        m.throttle_pct = self.throttle_pct;
        m.elapsed_ms = self.elapsed_ms;
        m.downtime_ms = self.downtime_ms;
        m.total_ms = self.total_ms;
        m.error = self.error.clone();
        m.tls = self.tls;
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Check a request's numbers before anything is reserved.
fn check_request(req: &MigrateRequest) -> Result<(), ApiError> {
    if let Some(d) = req.downtime_ms {
        if !(1..=60_000).contains(&d) {
            return Err(ApiError::bad_field(
                "downtime_ms",
                format!("downtime_ms {d}: use 1 to 60000"),
            ));
        }
    }
    if let Some(t) = req.timeout_s {
        if !(1..=86_400).contains(&t) {
            return Err(ApiError::bad_field(
                "timeout_s",
                format!("timeout_s {t}: use 1 to 86400"),
            ));
        }
    }
    if let Some(n) = req.precopy_rounds {
        if !req.postcopy {
            return Err(ApiError::bad_field(
                "precopy_rounds",
                "precopy_rounds only applies to post-copy: add postcopy, or drop it",
            ));
        }
        if n > 30 {
            return Err(ApiError::bad_field(
                "precopy_rounds",
                format!("precopy_rounds {n}: use 0 to 30"),
            ));
        }
    }
    if let Some(n) = req.connections {
        if !(1..=15).contains(&n) {
            return Err(ApiError::bad_field(
                "connections",
                format!("connections {n}: use 1 to 15"),
            ));
        }
    }
    if req.postcopy && req.copy_disks {
        return Err(ApiError::bad_field(
            "postcopy",
            "postcopy with copy_disks is not supported: use pre-copy to copy local disks",
        ));
    }
    Ok(())
}

/// The VMM's `migrate` request for `req`, sending to `endpoint`; with `tls`, over mutual TLS
/// with this daemon's certificate, checking the destination's for the server name.
fn vmm_request(req: &MigrateRequest, endpoint: &str, tls: Option<(&TlsIdentity, &str)>) -> Value {
    let mut v = json!({
        "op": "migrate",
        "to": endpoint,
        "downtime_ms": req.downtime_ms.unwrap_or(api::DEFAULT_MIGRATION_DOWNTIME_MS),
        "bandwidth_mib_s": req.bandwidth_mib_s.unwrap_or(0),
        "timeout_s": req.timeout_s.unwrap_or(api::DEFAULT_MIGRATION_TIMEOUT_S),
        "converge": req.converge.unwrap_or_default().as_str(),
        "copy_disks": req.copy_disks,
        "postcopy": req.postcopy,
        "precopy_rounds": req.precopy_rounds.unwrap_or(0),
        "connections": req.connections.unwrap_or(1),
    });
    if let Some((id, server_name)) = tls {
        v["tls_cert"] = id.cert.display().to_string().into();
        v["tls_key"] = id.key.display().to_string().into();
        v["tls_ca"] = id.ca.display().to_string().into();
        v["tls_server_name"] = server_name.into();
    }
    v
}

/// The source's side of the stream's TLS: our identity and the server name to check, None
/// for plaintext; refuses plaintext to another host when ours is `required`, and TLS the
/// destination asks for when ours is off.
fn outgoing_tls<'a>(
    identity: Option<&'a TlsIdentity>,
    incoming: &'a IncomingMigration,
    peer: &'a Peer,
) -> Result<Option<(&'a TlsIdentity, &'a str)>, ApiError> {
    match (identity, incoming.tls) {
        (Some(id), true) => {
            let name = incoming
                .tls_server_name
                .as_deref()
                .or(peer.tls_host())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::PeerUnavailable,
                        format!(
                            "The destination ferrited {} asks for TLS but names no server name for its certificate",
                            peer.describe()
                        ),
                    )
                })?;
            Ok(Some((id, name)))
        }
        (None, true) => Err(ApiError::new(
            ErrorCode::NotSupported,
            format!(
                "The destination ferrited {} takes only TLS migration streams, but this daemon's --migration-tls is off (or it has no --tls-cert, --tls-key and --tls-client-ca): give it those and --migration-tls required",
                peer.describe()
            ),
        )),
        (Some(_), false) if peer.is_remote() => Err(ApiError::new(
            ErrorCode::NotSupported,
            format!(
                "The destination ferrited {} would take the VM in plaintext (its --migration-tls is off): this daemon sends migrations to other hosts only over TLS (--migration-tls required); turn TLS on there, or use --migration-tls off here on a trusted network",
                peer.describe()
            ),
        )),
        // Plaintext: both off, or on this host.
        (_, false) => Ok(None),
    }
}

/// One line on a migration's progress (events).
fn progress_line(m: &MigrationInfo) -> String {
    format!(
        "round {}: {:.1} MiB left, {:.1} MiB/s, throttle {}%",
        m.round,
        mib(m.remaining_bytes),
        mib(m.rate_bytes_per_s),
        m.throttle_pct
    )
}

/// Whether a disk definition (`PATH[,options]`) attaches its image read-only.
fn is_read_only_disk(spec: &str) -> bool {
    spec.split(',').skip(1).any(|o| o == "readonly")
}

/// A disk definition (`PATH[,options]`) as a block migration receives it: the file in
/// `dir` with the same name, the options kept; read-only disks unchanged (not copied).
fn received_disk(spec: &str, dir: &std::path::Path) -> Result<String, ApiError> {
    let mut parts = spec.split(',');
    let path = std::path::Path::new(parts.next().unwrap_or_default());
    if is_read_only_disk(spec) {
        return Ok(spec.to_string());
    }
    let name = path.file_name().ok_or_else(|| {
        ApiError::bad_field(
            "disks",
            format!("disk {spec:?} has no file name to copy it to"),
        )
    })?;
    let mut out = dir.join(name).display().to_string();
    for o in parts {
        out.push(',');
        out.push_str(o);
    }
    Ok(out)
}

/// A free TCP port on `addr` (the VMM binds it a moment later).
fn free_port(addr: IpAddr) -> Result<u16, ApiError> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(addr, 0)).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("Cannot find a free port on the migration address {addr}: {e}"),
        )
    })?;
    Ok(listener.local_addr().map_err(internal)?.port())
}

impl Daemon {
    fn set_outgoing(&self, info: MigrationInfo) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut all = self.migrations.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(info.vm.clone(), Outgoing { id, info });
        id
    }

    /// Change the record of migration `id` of VM `name` while it is not over (or, with
    /// `force`, whatever its phase); returns the record after the change, None if it is
    /// another migration's or over.
    fn update_outgoing(
        &self,
        name: &str,
        id: Option<u64>,
        force: bool,
        f: impl FnOnce(&mut MigrationInfo),
    ) -> Option<MigrationInfo> {
        let mut all = self.migrations.lock().unwrap_or_else(|e| e.into_inner());
        let m = all.get_mut(name)?;
        if id.is_some_and(|id| id != m.id) || (!force && m.info.phase.is_done()) {
            return None;
        }
        f(&mut m.info);
        Some(m.info.clone())
    }

    /// Start migrating VM `slot` (caller holds its op lock) as `req` says: reserve it at the
    /// destination, start the VMM's migration and follow it on a task. Returns once the
    /// migration runs.
    pub async fn migrate_locked(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        req: &MigrateRequest,
    ) -> Result<MigrationInfo, ApiError> {
        check_request(req)?;
        let state = slot.runtime().state;
        if state != VmState::Running {
            return Err(conflict(format!(
                "VM {:?} is {}: only a running VM can be migrated{}",
                slot.name,
                state.as_str(),
                if state == VmState::Paused {
                    " (resume it first)"
                } else {
                    ""
                }
            )));
        }
        let spec = slot.spec();
        if let Some(m) = self.migration_of(&slot.name) {
            if !m.phase.is_done() {
                return Err(conflict(format!(
                    "VM {:?} is already migrating to {} ({})",
                    slot.name,
                    m.to,
                    m.phase.as_str()
                )));
            }
        }
        let peer = Peer::parse(&req.to, &self.args)?;
        let identity = self.args.migration_tls().map_err(internal)?;
        let incoming = peer
            .reserve(&IncomingMigrationRequest {
                spec,
                timeout_s: Some(req.timeout_s.unwrap_or(api::DEFAULT_MIGRATION_TIMEOUT_S)),
                tls: identity.is_some(),
                copy_disks: req.copy_disks,
            })
            .await?;
        let endpoint = peer.reachable_endpoint(&incoming.endpoint);
        let started = match outgoing_tls(identity.as_ref(), &incoming, &peer) {
            Ok(tls) => vmm_link::call(&slot.paths.control, &vmm_request(req, &endpoint, tls)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            if let Err(a) = peer.abandon(&slot.name).await {
                tracing::warn!(vm = %slot.name, "cannot drop the reservation at the destination: {a}");
            }
            return Err(e);
        }
        let info = MigrationInfo {
            vm: slot.name.clone(),
            to: req.to.clone(),
            endpoint: endpoint.clone(),
            phase: MigrationPhase::Connecting,
            started_ms: now_ms(),
            tls: incoming.tls,
            ..MigrationInfo::default()
        };
        let id = self.set_outgoing(info.clone());
        self.event(
            &slot.name,
            "migration-started",
            format!(
                "to {} ({endpoint}{})",
                peer.describe(),
                if incoming.tls { ", TLS" } else { "" }
            ),
        );
        let daemon = self.clone();
        let watched = slot.clone();
        tokio::spawn(async move { daemon.track(watched, id, peer).await });
        Ok(info)
    }

    /// Follow migration `id` of `slot` until it is over.
    async fn track(self: Arc<Self>, slot: Arc<VmSlot>, id: u64, peer: Peer) {
        let mut last_round = None;
        loop {
            tokio::time::sleep(POLL).await;
            let reply = vmm_link::call(&slot.paths.control, &json!({"op": "migrate-status"})).await;
            let Ok(reply) = reply else {
                // The VMM is gone: its exit (`on_exit`) says whether the guest went over.
                slot.wait_for(EXIT_WAIT, |rt| !rt.state.is_active()).await;
                self.outgoing_vmm_exited(&slot);
                return;
            };
            let Some(status) = VmmStatus::parse(&reply["migration"]) else {
                continue;
            };
            let Some(info) = self.update_outgoing(&slot.name, Some(id), false, |m| {
                status.apply(m);
                match m.phase {
                    MigrationPhase::None => {
                        m.phase = MigrationPhase::Failed;
                        m.error = Some("The VMM has no migration in progress".to_string());
                    }
                    // Completed only once `on_exit` forgot the VM here: a client that sees
                    // `completed` must find the VM gone.
                    MigrationPhase::Completed => m.phase = MigrationPhase::Final,
                    _ => {}
                }
            }) else {
                return;
            };
            match info.phase {
                MigrationPhase::Connecting | MigrationPhase::None => {}
                MigrationPhase::Copying | MigrationPhase::Final | MigrationPhase::Postcopy => {
                    if last_round != Some(info.round) && info.phase == MigrationPhase::Copying {
                        last_round = Some(info.round);
                        self.event(&slot.name, "migration-progress", progress_line(&info));
                    }
                }
                // Set by `on_exit` (the update above then declines): nothing left to watch.
                MigrationPhase::Completed => return,
                MigrationPhase::Failed | MigrationPhase::Cancelled => {
                    let (kind, why) = match info.phase {
                        MigrationPhase::Cancelled => ("migration-cancelled", "cancelled"),
                        _ => ("migration-failed", "failed"),
                    };
                    self.event(
                        &slot.name,
                        kind,
                        info.error.clone().unwrap_or_else(|| why.to_string()),
                    );
                    // The commit was never sent: the destination must not keep the VM.
                    if let Err(e) = peer.abandon(&slot.name).await {
                        tracing::warn!(vm = %slot.name, "cannot drop the reservation at the destination: {e}");
                    }
                    return;
                }
                MigrationPhase::Unknown => {
                    let changed = slot.update_runtime(|rt| {
                        let was = rt.state == VmState::Running;
                        if was {
                            rt.state = VmState::Paused;
                        }
                        was
                    });
                    if changed {
                        let _ = self.persist_runtime(&slot);
                    }
                    self.event(
                        &slot.name,
                        "migration-unknown",
                        format!(
                            "the destination did not confirm the commit: the guest stays paused here; if {} does not run it, resume it here ({})",
                            peer.describe(),
                            info.error.clone().unwrap_or_default()
                        ),
                    );
                    return;
                }
            }
        }
    }

    /// The source VMM ended with the outcome `migrated` (from `on_exit`): the guest runs on
    /// the destination, so the VM is forgotten here.
    pub fn finish_outgoing_migration(
        &self,
        slot: &Arc<VmSlot>,
        final_status: Option<Value>,
        detail: &str,
    ) {
        let status = final_status
            .as_ref()
            .and_then(VmmStatus::parse)
            .unwrap_or_default();
        let apply = |m: &mut MigrationInfo| {
            status.apply(m);
            m.phase = MigrationPhase::Completed;
        };
        // Forget first: whoever sees `completed` finds the VM gone here.
        self.forget_vm(slot, true);
        if self
            .update_outgoing(&slot.name, None, true, apply)
            .is_none()
        {
            // Started before this daemon did (it was restarted meanwhile).
            let mut info = MigrationInfo {
                vm: slot.name.clone(),
                ..MigrationInfo::default()
            };
            apply(&mut info);
            self.set_outgoing(info);
        }
        self.event(&slot.name, "migrated", detail.to_string());
        self.event(&slot.name, "deleted", "migrated away");
    }

    /// The VM's VMM ended some other way during a migration: the migration failed.
    pub fn outgoing_vmm_exited(&self, slot: &VmSlot) {
        let outcome = slot
            .runtime()
            .last_exit
            .map(|e| e.outcome)
            .unwrap_or_else(|| "gone".to_string());
        if outcome == "migrated" {
            return;
        }
        let failed = self.update_outgoing(&slot.name, None, false, |m| {
            m.phase = MigrationPhase::Failed;
            m.error = Some(format!(
                "The VM's monitor exited ({outcome}) during the migration"
            ));
        });
        if let Some(m) = failed {
            self.event(&slot.name, "migration-failed", m.error.unwrap_or_default());
        }
    }

    /// `GET /v1/vms/{name}/migration`: the last outgoing migration of `name` (also once the
    /// VM left), else what its VMM reports (after a daemon restart), else phase `none`.
    pub async fn migration_status(&self, name: &str) -> Result<MigrationInfo, ApiError> {
        if let Some(info) = self.migration_of(name) {
            return Ok(info);
        }
        let slot = self.slot(name)?;
        let mut info = MigrationInfo {
            vm: name.to_string(),
            ..MigrationInfo::default()
        };
        if matches!(slot.runtime().state, VmState::Running | VmState::Paused) {
            if let Ok(reply) =
                vmm_link::call(&slot.paths.control, &json!({"op": "migrate-status"})).await
            {
                if let Some(status) = VmmStatus::parse(&reply["migration"]) {
                    status.apply(&mut info);
                }
            }
        }
        Ok(info)
    }

    /// `POST /v1/vms/{name}/migrate/cancel`: the VM keeps running here (unless the commit was
    /// already sent). Returns the record once the migration is over (or after a while).
    pub async fn cancel_migration(&self, name: &str) -> Result<MigrationInfo, ApiError> {
        let slot = self.slot(name)?;
        match self.migration_of(name) {
            Some(m) if !m.phase.is_done() => {}
            _ => {
                return Err(conflict(format!(
                    "VM {name:?} is not migrating (see GET /v1/vms/{name}/migration)"
                )))
            }
        }
        vmm_link::call(&slot.paths.control, &json!({"op": "migrate-cancel"}))
            .await
            .map_err(|e| match e.code {
                ErrorCode::BadRequest => conflict(format!(
                    "VM {name:?} is not migrating any more: {}",
                    e.message
                )),
                _ => e,
            })?;
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let m = self
                .migration_of(name)
                .ok_or_else(|| ApiError::no_vm(name))?;
            if m.phase.is_done() || tokio::time::Instant::now() > deadline {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ----- destination -----

    /// `POST /v1/migrations/incoming`: reserve `req.spec`'s name and start a VMM that waits
    /// for the source; returns where the source must send the VM.
    /// `via`: how the request arrived (None: the Unix socket, a source on this host).
    pub async fn accept_incoming(
        self: &Arc<Self>,
        req: IncomingMigrationRequest,
        via: Option<ViaTls>,
    ) -> Result<IncomingMigration, ApiError> {
        let Some(addr) = self.args.migration_addr else {
            return Err(ApiError::new(
                ErrorCode::NotSupported,
                "This daemon takes no incoming migrations: start ferrited with --migration-addr IP",
            ));
        };
        let identity = self.args.migration_tls().map_err(internal)?;
        let stream = stream_tls::incoming_stream(identity.as_ref(), req.tls, via.as_ref(), addr)?;
        let mut spec = req.spec;
        let paths =
            crate::paths::VmPaths::new(&self.args.run_dir, &self.args.state_dir, &spec.name);
        // A block migration's disks go to this daemon's disk directory for the VM; the
        // definition points at them (read-only disks stay where they are: not copied). The
        // copies do not exist yet, so the definition is checked without them.
        let mut checked = spec.clone();
        if req.copy_disks {
            checked.disks.retain(|d| is_read_only_disk(d));
        }
        spec::to_vm_config(&checked, &paths.control)?;
        if req.copy_disks {
            spec.disks = spec
                .disks
                .iter()
                .map(|d| received_disk(d, &paths.disks))
                .collect::<Result<_, _>>()?;
        }
        self.check_capacity(&spec.name, spec.vcpus, spec.memory_mib)?;
        let value = serde_json::to_value(&spec).map_err(internal)?;
        self.store
            .create_vm(&spec.name, &value)
            .map_err(store_error)?;
        let timeout_s = req
            .timeout_s
            .unwrap_or(api::DEFAULT_MIGRATION_TIMEOUT_S)
            .min(86_400);
        let name = spec.name.clone();
        // `incoming` from the start, so nothing starts it meanwhile.
        let slot = self.insert_slot(
            spec,
            Runtime {
                state: VmState::Incoming,
                ..Runtime::default()
            },
        );
        let _ = self.persist_runtime(&slot);
        self.event(&name, "defined", "incoming migration");
        let _guard = slot.op_lock.clone().lock_owned().await;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(timeout_s + INCOMING_GRACE_S);
        let disk_dir = if req.copy_disks {
            if let Err(e) = std::fs::create_dir_all(&slot.paths.disks) {
                self.drop_incoming(&slot, &e.to_string());
                return Err(internal(e));
            }
            Some(slot.paths.disks.clone())
        } else {
            None
        };
        let (listen, tls, tls_server_name) = match stream {
            IncomingStream::Tls { server_name } => (addr, identity.as_ref(), Some(server_name)),
            IncomingStream::Plain { listen } => (listen, None, None),
        };
        match self
            .launch_incoming(&slot, listen, tls, deadline, disk_dir.as_deref())
            .await
        {
            Ok(endpoint) => Ok(IncomingMigration {
                vm: slot.info(),
                endpoint,
                tls: tls.is_some(),
                tls_server_name,
            }),
            Err(e) => {
                self.drop_incoming(&slot, &e.message);
                Err(e)
            }
        }
    }

    /// Run the incoming VMM of `slot` on a free port of `addr` (with `tls`, taking only TLS
    /// sources) and wait until it listens.
    async fn launch_incoming(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        addr: IpAddr,
        tls: Option<&TlsIdentity>,
        deadline: tokio::time::Instant,
        disk_dir: Option<&std::path::Path>,
    ) -> Result<String, ApiError> {
        let port = free_port(addr)?;
        let endpoint = format!("tcp:{}", SocketAddr::new(addr, port));
        let launch = Launch::Incoming {
            endpoint: &endpoint,
            tls,
            disk_dir,
        };
        let (pid, generation) = self.spawn_vmm(slot, true, launch)?;
        let until = tokio::time::Instant::now() + LISTEN_WAIT;
        loop {
            let rt = slot.runtime();
            if rt.generation != generation || rt.state != VmState::Incoming {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "The incoming VMM of {:?} exited: {}",
                        slot.name,
                        last_stderr_line(slot)
                    ),
                ));
            }
            if procfs::tcp_listening(port) {
                break;
            }
            if tokio::time::Instant::now() > until {
                slot.update_runtime(|rt| rt.stop_intent = Some(StopIntent::Kill));
                let _ = procfs::kill(pid, libc::SIGKILL);
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "The incoming VMM of {:?} did not listen on {endpoint} within {} s",
                        slot.name,
                        LISTEN_WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.watch_incoming(slot.clone(), generation, pid, deadline);
        Ok(endpoint)
    }

    /// Wait (on a task) until the incoming VM of run `generation` runs here, or kill it at
    /// `deadline`.
    fn watch_incoming(
        self: &Arc<Self>,
        slot: Arc<VmSlot>,
        generation: u64,
        pid: u32,
        deadline: tokio::time::Instant,
    ) {
        let daemon = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INCOMING_POLL).await;
                let rt = slot.runtime();
                if rt.generation != generation || rt.state != VmState::Incoming {
                    return;
                }
                if daemon.incoming_runs(&slot, generation).await {
                    return;
                }
                if tokio::time::Instant::now() > deadline {
                    tracing::warn!(vm = %slot.name, "the incoming migration did not arrive in time: killing its VMM");
                    slot.update_runtime(|rt| {
                        if rt.generation == generation {
                            rt.stop_intent = Some(StopIntent::Kill);
                        }
                    });
                    let _ = procfs::kill(pid, libc::SIGKILL);
                    return;
                }
            }
        });
    }

    /// If the incoming VM of run `generation` answers on its control socket (its guest
    /// runs here), make it an ordinary running VM; returns whether it runs.
    async fn incoming_runs(&self, slot: &Arc<VmSlot>, generation: u64) -> bool {
        if vmm_link::call(&slot.paths.control, &json!({"op": "info"}))
            .await
            .is_err()
        {
            return false;
        }
        let arrived = slot.update_runtime(|rt| {
            let arrived = rt.generation == generation && rt.state == VmState::Incoming;
            if arrived {
                rt.state = VmState::Running;
            }
            arrived
        });
        if arrived {
            let _ = self.persist_runtime(slot);
            let pid = slot.runtime().pid.unwrap_or(0);
            self.event(&slot.name, "running", format!("pid {pid}"));
            self.event(&slot.name, "migrated-in", "the guest runs here");
        }
        true
    }

    /// After a daemon restart: keep watching an incoming VMM that still waits.
    pub fn adopt_incoming(self: &Arc<Self>, slot: &Arc<VmSlot>, pid: u32) {
        let pidfd = match procfs::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(vm = %slot.name, "cannot watch pid {pid}: {e}");
                return;
            }
        };
        let generation = slot.update_runtime(|rt| {
            rt.generation += 1;
            rt.generation
        });
        self.event(
            &slot.name,
            "adopted",
            format!("pid {pid}, incoming migration"),
        );
        let daemon = self.clone();
        let watched = slot.clone();
        tokio::spawn(async move {
            let _ = procfs::wait_pidfd(pidfd).await;
            daemon.on_exit(&watched, generation, None).await;
        });
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(api::DEFAULT_MIGRATION_TIMEOUT_S + INCOMING_GRACE_S);
        self.watch_incoming(slot.clone(), generation, pid, deadline);
    }

    /// An incoming migration ended before its guest ran here: forget the reservation.
    pub fn drop_incoming(&self, slot: &Arc<VmSlot>, detail: &str) {
        if !self.slot(&slot.name).is_ok_and(|s| Arc::ptr_eq(&s, slot)) {
            return;
        }
        self.event(&slot.name, "incoming-failed", detail.to_string());
        self.forget_vm(slot, false);
        // A block migration's directory (its VMM removed the images it created).
        crate::snapshots::remove_dir(&slot.paths.disks);
        if let Some(cg) = self.cgroups.as_ref().and_then(|m| m.open(&slot.name)) {
            let _ = cg.remove_when_empty(Duration::from_secs(2));
        }
        self.event(&slot.name, "deleted", "incoming migration failed");
    }

    /// `DELETE /v1/migrations/incoming/{name}` (the source gave up before its commit): kill
    /// the incoming VMM of `slot` (caller holds its op lock) and drop the reservation.
    /// Refused once the guest runs here.
    pub async fn abandon_incoming_locked(&self, slot: &Arc<VmSlot>) -> Result<(), ApiError> {
        let rt = slot.runtime();
        if rt.state != VmState::Incoming {
            return Err(conflict(format!(
                "VM {:?} is {}, not an incoming migration",
                slot.name,
                rt.state.as_str()
            )));
        }
        if self.incoming_runs(slot, rt.generation).await {
            return Err(conflict(format!(
                "VM {:?} already runs here: the migration completed",
                slot.name
            )));
        }
        match rt.pid {
            Some(_) => self.kill_locked(slot).await,
            None => {
                self.drop_incoming(slot, "abandoned by the source");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vmm_request_fills_defaults_and_names_converge() {
        let req = MigrateRequest {
            to: "/run/b.sock".into(),
            converge: Some(api::Converge::Abort),
            ..MigrateRequest::default()
        };

        let v = vmm_request(&req, "tcp:127.0.0.1:4000", None);

        assert_eq!(v["op"], "migrate");
        assert_eq!(v["to"], "tcp:127.0.0.1:4000");
        assert_eq!(v["downtime_ms"], 10);
        assert_eq!(v["timeout_s"], 120);
        assert_eq!(v["bandwidth_mib_s"], 0);
        assert_eq!(v["converge"], "abort");
        assert_eq!(v["copy_disks"], false);
        assert_eq!(v["postcopy"], false);
        assert_eq!(v["connections"], 1);
    }

    #[test]
    fn test_postcopy_options_are_checked_and_passed_to_the_vmm() {
        let req = MigrateRequest {
            to: "/run/b.sock".into(),
            postcopy: true,
            precopy_rounds: Some(1),
            ..MigrateRequest::default()
        };
        let lone_rounds = MigrateRequest {
            postcopy: false,
            ..req.clone()
        };
        let with_disks = MigrateRequest {
            copy_disks: true,
            ..req.clone()
        };

        let v = vmm_request(&req, "tcp:127.0.0.1:4000", None);

        assert!(check_request(&req).is_ok());
        assert!(check_request(&lone_rounds).is_err());
        assert!(check_request(&with_disks).is_err());
        assert_eq!(v["postcopy"], true);
        assert_eq!(v["precopy_rounds"], 1);
    }

    #[test]
    fn test_received_disks_move_to_the_disk_dir_and_read_only_ones_stay() {
        let dir = std::path::Path::new("/var/lib/ferrited/disks/web");

        let rw = received_disk("/srv/web.qcow2,format=qcow2,bw=20M", dir).unwrap();
        let ro = received_disk("/srv/iso.img,readonly", dir).unwrap();
        let bare = received_disk("/srv/data.img", dir).unwrap();

        assert_eq!(
            rw,
            "/var/lib/ferrited/disks/web/web.qcow2,format=qcow2,bw=20M"
        );
        assert_eq!(ro, "/srv/iso.img,readonly");
        assert_eq!(bare, "/var/lib/ferrited/disks/web/data.img");
        assert!(received_disk("/", dir).is_err());
    }

    fn reservation(tls: bool, server_name: Option<&str>) -> IncomingMigration {
        serde_json::from_value(json!({
            "vm": {"spec": {"name": "a", "kernel": "/k"}, "state": "incoming"},
            "endpoint": "tcp:10.0.0.2:4000",
            "tls": tls,
            "tls_server_name": server_name,
        }))
        .unwrap()
    }

    fn https_peer() -> Peer {
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
        .with_no_client_auth();
        Peer::Https {
            host: "b.example".into(),
            port: 8443,
            config: Arc::new(config),
        }
    }

    #[test]
    fn test_source_passes_its_identity_and_the_reported_server_name_to_its_vmm() {
        let id = TlsIdentity {
            cert: "/etc/f/a.pem".into(),
            key: "/etc/f/a.key".into(),
            ca: "/etc/f/ca.pem".into(),
        };
        let incoming = reservation(true, Some("10.0.0.2"));
        let peer = https_peer();

        let tls = outgoing_tls(Some(&id), &incoming, &peer).unwrap();
        let v = vmm_request(&MigrateRequest::default(), "tcp:10.0.0.2:4000", tls);

        assert_eq!(v["tls_cert"], "/etc/f/a.pem");
        assert_eq!(v["tls_key"], "/etc/f/a.key");
        assert_eq!(v["tls_ca"], "/etc/f/ca.pem");
        assert_eq!(v["tls_server_name"], "10.0.0.2");
    }

    #[test]
    fn test_source_refuses_plaintext_to_another_host_and_tls_it_cannot_do() {
        let id = TlsIdentity {
            cert: "/a.pem".into(),
            key: "/a.key".into(),
            ca: "/ca.pem".into(),
        };
        let (plain, tls) = (reservation(false, None), reservation(true, Some("b")));
        let (remote, local) = (https_peer(), Peer::Unix("/run/b.sock".into()));

        let to_remote = outgoing_tls(Some(&id), &plain, &remote).unwrap_err();
        let without_files = outgoing_tls(None, &tls, &local).unwrap_err();

        assert!(
            to_remote.message.contains("plaintext"),
            "{}",
            to_remote.message
        );
        assert!(
            without_files.message.contains("only TLS"),
            "{}",
            without_files.message
        );
        assert!(outgoing_tls(Some(&id), &plain, &local).unwrap().is_none());
        assert!(outgoing_tls(None, &plain, &remote).unwrap().is_none());
    }

    #[test]
    fn test_out_of_range_numbers_name_their_field() {
        let req = |downtime_ms, timeout_s| MigrateRequest {
            to: "/x".into(),
            downtime_ms,
            timeout_s,
            ..MigrateRequest::default()
        };

        let down = check_request(&req(Some(0), None)).unwrap_err();
        let time = check_request(&req(None, Some(100_000))).unwrap_err();

        assert_eq!(down.field.as_deref(), Some("downtime_ms"));
        assert_eq!(time.field.as_deref(), Some("timeout_s"));
        assert!(check_request(&req(Some(50), Some(30))).is_ok());
    }

    #[test]
    fn test_vmm_status_reads_the_control_socket_fields() {
        let v = json!({"phase": "copying", "to": "tcp:h:1", "round": 2,
                       "remaining_bytes": 4096, "rate_bytes_per_s": 1048576,
                       "throttle_pct": 20, "downtime_ms": null});
        let mut m = MigrationInfo::default();

        VmmStatus::parse(&v).unwrap().apply(&mut m);

        assert_eq!(m.phase, MigrationPhase::Copying);
        assert_eq!(m.round, 2);
        assert_eq!(m.throttle_pct, 20);
        assert_eq!(
            progress_line(&m),
            "round 2: 0.0 MiB left, 1.0 MiB/s, throttle 20%"
        );
    }
}
