//! The REST API: one axum handler per route of [`api::routes::ALL`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api::{
    ApiError, ErrorCode, SnapshotInfo, SnapshotRequest, StopRequest, VmInfo, VmSpec, VmState,
    VmUpdate,
};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OwnedMutexGuard;

use crate::app::{Daemon, Runtime, VmSlot};
use crate::error::{conflict, internal, store_error, HttpError, HttpResult};
use crate::supervisor::DEFAULT_STOP_TIMEOUT_S;
use crate::{metrics, resources, spec, stats, vmm_link};

type AppState = State<Arc<Daemon>>;

/// The API router over `daemon`.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(prometheus))
        .route("/v1/host", get(host))
        .route("/v1/stats", get(all_stats))
        .route("/v1/events", get(events))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).patch(update).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/kill", post(kill))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/reboot", post(reboot))
        .route("/v1/vms/{name}/stats", get(vm_stats))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/console/log", get(console_log))
        .route(
            "/v1/vms/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}/restore",
            post(restore_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}/clone",
            post(clone_snapshot),
        )
        .route(
            "/v1/vms/{name}/disk-snapshots",
            get(list_disk_snapshots).post(create_disk_snapshot),
        )
        .route(
            "/v1/vms/{name}/disk-snapshots/{tag}/revert",
            post(revert_disk_snapshot),
        )
        .route("/v1/vms/{name}/disks/{disk}/flatten", post(flatten_disk))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/migrate/cancel", post(cancel_migration))
        .route("/v1/vms/{name}/migration", get(migration))
        .route("/v1/migrations/incoming", post(accept_incoming))
        .route(
            "/v1/migrations/incoming/{name}",
            axum::routing::delete(abandon_incoming),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(daemon)
}

async fn not_found() -> HttpError {
    ApiError::new(ErrorCode::NotFound, "No such route: see /openapi.json").into()
}

async fn method_not_allowed() -> Response {
    let body = ApiError::new(
        ErrorCode::MethodNotAllowed,
        "Method not allowed on this route: see /openapi.json",
    );
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// A query string that does not parse: 400 with the JSON error body like every other failure.
fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::new(
        ErrorCode::BadRequest,
        format!("Invalid query string: {}", rejection.body_text()),
    )
}

/// Parse a JSON body, naming the offending field on error.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::new(
                ErrorCode::BadRequest,
                format!("The body is not valid JSON: {inner}"),
            );
        }
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::bad_field(field.clone(), format!("{field}: {inner}"))
    })
}

/// Lock VM `name` for a lifecycle operation, making sure it was not deleted meanwhile.
async fn lock_vm(d: &Daemon, name: &str) -> Result<(Arc<VmSlot>, OwnedGuard), ApiError> {
    let slot = d.slot(name)?;
    let guard = slot.op_lock.clone().lock_owned().await;
    match d.slot(name) {
        Ok(now) if Arc::ptr_eq(&now, &slot) => Ok((slot, guard)),
        _ => Err(ApiError::no_vm(name)),
    }
}

/// Guard of a VM's op lock.
pub type OwnedGuard = OwnedMutexGuard<()>;

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        api::OPENAPI_JSON,
    )
        .into_response()
}

async fn collect_all(d: &Daemon) -> Vec<api::VmStats> {
    let slots = d.slots();
    let futs = slots.iter().map(|s| stats::collect(d, s));
    futures_util::future::join_all(futs).await
}

async fn prometheus(State(d): AppState) -> Response {
    let all = collect_all(&d).await;
    let migrations: Vec<api::MigrationInfo> = d
        .migrations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|m| m.info.clone())
        .collect();
    let text = metrics::render(&d.host_info(), &all, &migrations);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn host(State(d): AppState) -> Json<api::HostInfo> {
    Json(d.host_info())
}

async fn all_stats(State(d): AppState) -> Json<Vec<api::VmStats>> {
    Json(collect_all(&d).await)
}

async fn vm_stats(State(d): AppState, Path(name): Path<String>) -> HttpResult<Json<api::VmStats>> {
    let slot = d.slot(&name)?;
    Ok(Json(stats::collect(&d, &slot).await))
}

async fn list(State(d): AppState) -> Json<Vec<VmInfo>> {
    Json(d.slots().iter().map(|s| s.info()).collect())
}

async fn show(State(d): AppState, Path(name): Path<String>) -> HttpResult<Json<VmInfo>> {
    Ok(Json(d.slot(&name)?.info()))
}

async fn create(State(d): AppState, body: Bytes) -> HttpResult<(StatusCode, Json<VmInfo>)> {
    let spec: VmSpec = parse_body(&body)?;
    let paths = crate::paths::VmPaths::new(&d.args.run_dir, &d.args.state_dir, &spec.name);
    spec::to_vm_config(&spec, &paths.control)?;
    let value = serde_json::to_value(&spec).map_err(internal)?;
    d.store.create_vm(&spec.name, &value).map_err(store_error)?;
    let name = spec.name.clone();
    let slot = d.insert_slot(spec, Runtime::default());
    d.event(&name, "defined", "");
    Ok((StatusCode::CREATED, Json(slot.info())))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(d): AppState,
    Path(name): Path<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> HttpResult<StatusCode> {
    let Query(q) = q.map_err(bad_query)?;
    let (slot, _guard) = lock_vm(&d, &name).await?;
    let state = slot.runtime().state;
    if state.is_active() {
        if !q.force {
            return Err(conflict(format!(
                "VM {name:?} is {}: stop it first or delete with force=true",
                state.as_str()
            ))
            .into());
        }
        d.kill_locked(&slot).await?;
    }
    match d.store.delete_vm(&name) {
        // A killed incoming migration drops its reservation itself.
        Ok(()) | Err(store::StoreError::NotFound(_)) => {}
        Err(e) => return Err(store_error(e).into()),
    }
    d.remove_slot(&name);
    let _ = std::fs::remove_dir_all(&slot.paths.dir);
    let _ = std::fs::remove_file(&slot.paths.console_log);
    let _ = std::fs::remove_file(&slot.paths.vmm_log);
    crate::snapshots::remove_dir(&slot.paths.snapshots);
    crate::snapshots::remove_dir(&slot.paths.disks);
    if let Some(cg) = d.cgroups.as_ref().and_then(|m| m.open(&name)) {
        let _ = cg.remove_when_empty(std::time::Duration::from_secs(2));
    }
    d.event(&name, "deleted", "");
    Ok(StatusCode::NO_CONTENT)
}

async fn update(
    State(d): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> HttpResult<Json<VmInfo>> {
    let upd: VmUpdate = parse_body(&body)?;
    let (slot, _guard) = lock_vm(&d, &name).await?;
    let state = slot.runtime().state;
    let live = matches!(state, VmState::Running | VmState::Paused);
    if state.is_active()
        && (upd.vcpus.is_some() || upd.memory_mib.is_some() || upd.cmdline.is_some())
    {
        return Err(conflict(format!(
            "VM {name:?} is {}: vcpus, memory_mib and cmdline change only while it is stopped",
            state.as_str()
        ))
        .into());
    }
    if !live && (upd.balloon_mib.is_some() || !upd.rate_limits.is_empty()) {
        return Err(conflict(format!(
            "VM {name:?} is {}: balloon_mib and rate_limits act on a running VM (set start-time limits in its device strings)",
            state.as_str()
        ))
        .into());
    }
    let mut new = slot.spec();
    if let Some(v) = upd.vcpus {
        new.vcpus = v;
    }
    if let Some(m) = upd.memory_mib {
        new.memory_mib = m;
    }
    if let Some(c) = &upd.cmdline {
        new.cmdline = c.clone();
    }
    if let Some(a) = upd.autostart {
        new.autostart = a;
    }
    if let Some(r) = upd.restart_on_crash {
        new.restart_on_crash = r;
    }
    if let Some(r) = &upd.resources {
        if let Some(v) = r.cpu_quota_pct {
            new.resources.cpu_quota_pct = v;
        }
        if let Some(v) = r.cpu_weight {
            new.resources.cpu_weight = v;
        }
        if let Some(v) = r.memory_limit_mib {
            new.resources.memory_limit_mib = v;
        }
        if let Some(v) = &r.pin_cpus {
            new.resources.pin_cpus = v.clone();
        }
    }
    spec::to_vm_config(&new, &slot.paths.control)?;
    let mut changes = Vec::new();
    if live {
        if new.resources != slot.spec().resources {
            match d.cgroups.as_ref().and_then(|m| m.open(&name)) {
                Some(cg) => resources::apply(&cg, &new.resources, new.memory_mib)?,
                None => resources::refuse_without_cgroups(&new.resources)?,
            }
            changes.push("resources".to_string());
        }
        if let Some(mib) = upd.balloon_mib {
            vmm_link::call(
                &slot.paths.control,
                &json!({"op": "balloon-set", "target_mib": mib}),
            )
            .await?;
            changes.push(format!("balloon {mib} MiB"));
        }
        for (device, l) in &upd.rate_limits {
            vmm_link::call(
                &slot.paths.control,
                &json!({"op": "rate-limit", "device": device,
                        "bytes_per_s": l.bytes_per_s.unwrap_or(0),
                        "ops_per_s": l.ops_per_s.unwrap_or(0)}),
            )
            .await
            .map_err(|mut e| {
                if e.code == ErrorCode::BadRequest {
                    e.field = Some(format!("rate_limits.{device}"));
                }
                e
            })?;
            changes.push(format!("rate limit {device}"));
        }
    }
    if new != slot.spec() {
        slot.set_spec(new);
        d.persist_spec(&slot)?;
        changes.push("definition".to_string());
    }
    d.event(&name, "updated", changes.join(", "));
    Ok(Json(slot.info()))
}

async fn start(State(d): AppState, Path(name): Path<String>) -> HttpResult<Json<VmInfo>> {
    let (slot, _guard) = lock_vm(&d, &name).await?;
    d.start_locked(&slot, true, None).await?;
    Ok(Json(slot.info()))
}

async fn stop(
    State(d): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> HttpResult<Json<VmInfo>> {
    let req: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StopRequest::default()
    } else {
        parse_body(&body)?
    };
    let timeout = Duration::from_secs(req.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S));
    // Run the stop in its own task so it completes even if the client goes away.
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.stop_locked(&slot, timeout).await?;
        Ok::<_, ApiError>(slot.info())
    });
    let info = task.await.map_err(internal)??;
    Ok(Json(info))
}

async fn list_snapshots(
    State(d): AppState,
    Path(name): Path<String>,
) -> HttpResult<Json<Vec<SnapshotInfo>>> {
    let slot = d.slot(&name)?;
    Ok(Json(d.list_snapshots(&slot)?))
}

async fn create_snapshot(
    State(d): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> HttpResult<(StatusCode, Json<SnapshotInfo>)> {
    let req: SnapshotRequest = parse_body(&body)?;
    crate::snapshots::check_name("name", &req.name)?;
    // Its own task: the snapshot completes (and is recorded) even if the client goes away.
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.snapshot_locked(&slot, &req).await
    });
    let info = task.await.map_err(internal)??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete_snapshot(
    State(d): AppState,
    Path((name, snapshot)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    let (slot, _guard) = lock_vm(&d, &name).await?;
    d.delete_snapshot_locked(&slot, &snapshot)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restore_snapshot(
    State(d): AppState,
    Path((name, snapshot)): Path<(String, String)>,
) -> HttpResult<Json<VmInfo>> {
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.restore_locked(&slot, &snapshot).await?;
        Ok::<_, ApiError>(slot.info())
    });
    let info = task.await.map_err(internal)??;
    Ok(Json(info))
}

async fn clone_snapshot(
    State(d): AppState,
    Path((name, snapshot)): Path<(String, String)>,
    body: Bytes,
) -> HttpResult<(StatusCode, Json<Vec<VmInfo>>)> {
    let req: api::CloneRequest = parse_body(&body)?;
    // Its own task: the clones are started (or all discarded) even if the client goes away.
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.clone_snapshot_locked(&slot, &snapshot, &req).await
    });
    let infos = task.await.map_err(internal)??;
    Ok((StatusCode::CREATED, Json(infos)))
}

async fn list_disk_snapshots(
    State(d): AppState,
    Path(name): Path<String>,
) -> HttpResult<Json<api::DiskSnapshotList>> {
    let slot = d.slot(&name)?;
    Ok(Json(d.list_disk_snapshots(&slot)?))
}

async fn create_disk_snapshot(
    State(d): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> HttpResult<(StatusCode, Json<api::DiskSnapshotInfo>)> {
    let req: api::DiskSnapshotRequest = parse_body(&body)?;
    vmm::disk_snapshot::check_tag(&req.tag).map_err(|m| ApiError::bad_field("tag", m))?;
    // Its own task: once the VMM switched the disks, the definition follows them even if the
    // client goes away.
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.disk_snapshot_locked(&slot, &req.tag).await
    });
    let info = task.await.map_err(internal)??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn revert_disk_snapshot(
    State(d): AppState,
    Path((name, tag)): Path<(String, String)>,
) -> HttpResult<Json<api::DiskRevertInfo>> {
    let (slot, _guard) = lock_vm(&d, &name).await?;
    Ok(Json(d.revert_disk_snapshot_locked(&slot, &tag)?))
}

async fn flatten_disk(
    State(d): AppState,
    Path((name, disk)): Path<(String, String)>,
) -> HttpResult<Json<api::FlattenInfo>> {
    let index: usize = disk.parse().map_err(|_| {
        ApiError::bad_field(
            "disk",
            format!("disk {disk:?}: give the disk's number in the VM's disks (0, 1, ...)"),
        )
    })?;
    let (slot, _guard) = lock_vm(&d, &name).await?;
    // Copies the whole disk: off the async workers.
    let task = tokio::task::spawn_blocking(move || d.flatten_disk_locked(&slot, index));
    Ok(Json(task.await.map_err(internal)??))
}

async fn migrate(
    State(d): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> HttpResult<(StatusCode, Json<api::MigrationInfo>)> {
    let req: api::MigrateRequest = parse_body(&body)?;
    // Its own task: once the destination reserved the VM, the migration starts (or the
    // reservation is dropped) even if the client goes away.
    let task = tokio::spawn(async move {
        let (slot, _guard) = lock_vm(&d, &name).await?;
        d.migrate_locked(&slot, &req).await
    });
    let info = task.await.map_err(internal)??;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn migration(
    State(d): AppState,
    Path(name): Path<String>,
) -> HttpResult<Json<api::MigrationInfo>> {
    Ok(Json(d.migration_status(&name).await?))
}

async fn cancel_migration(
    State(d): AppState,
    Path(name): Path<String>,
) -> HttpResult<Json<api::MigrationInfo>> {
    Ok(Json(d.cancel_migration(&name).await?))
}

async fn accept_incoming(
    State(d): AppState,
    via: Option<axum::Extension<crate::server::ViaTls>>,
    body: Bytes,
) -> HttpResult<(StatusCode, Json<api::IncomingMigration>)> {
    let req: api::IncomingMigrationRequest = parse_body(&body)?;
    let via = via.map(|axum::Extension(v)| v);
    // Its own task: a reservation is either handed out or dropped again.
    let task = tokio::spawn(async move { d.accept_incoming(req, via).await });
    let info = task.await.map_err(internal)??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn abandon_incoming(State(d): AppState, Path(name): Path<String>) -> HttpResult<StatusCode> {
    let (slot, _guard) = lock_vm(&d, &name).await?;
    d.abandon_incoming_locked(&slot).await?;
    Ok(StatusCode::NO_CONTENT)
}

macro_rules! simple_action {
    ($fn:ident, |$d:ident, $slot:ident| $body:expr) => {
        async fn $fn(State($d): AppState, Path(name): Path<String>) -> HttpResult<Json<VmInfo>> {
            let ($slot, _guard) = lock_vm(&$d, &name).await?;
            $body.await?;
            Ok(Json($slot.info()))
        }
    };
}

simple_action!(kill, |d, slot| d.kill_locked(&slot));
simple_action!(pause, |d, slot| d.pause_resume_locked(&slot, true));
simple_action!(resume, |d, slot| d.pause_resume_locked(&slot, false));
simple_action!(reboot, |d, slot| d.reboot_locked(&slot));

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: Option<u64>,
}

async fn events(
    State(d): AppState,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> HttpResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let Query(q) = q.map_err(bad_query)?;
    let since = q.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    });
    // Subscribe before reading the backlog so nothing falls in between.
    let rx = d.events.subscribe();
    let backlog = match since {
        Some(id) => d
            .store
            .events_after(id as i64, 10_000)
            .map_err(store_error)?,
        None => Vec::new(),
    };
    let mut last = since.unwrap_or(0);
    let mut past = Vec::new();
    for ev in backlog {
        last = last.max(ev.id as u64);
        past.push(api::Event {
            id: ev.id as u64,
            at_ms: ev.at_ms as u64,
            vm: ev.vm,
            kind: ev.kind,
            detail: ev.detail,
        });
    }
    let live = tokio_stream::wrappers::BroadcastStream::new(rx)
        .filter_map(move |r| async move { r.ok().filter(|e| e.id > last) });
    let all = stream::iter(past).chain(live).map(|e| {
        Ok(SseEvent::default()
            .id(e.id.to_string())
            .event("vm")
            .data(serde_json::to_string(&e).unwrap_or_default()))
    });
    Ok(Sse::new(all).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    tail: Option<u64>,
}

async fn console_log(
    State(d): AppState,
    Path(name): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> HttpResult<Response> {
    let Query(q) = q.map_err(bad_query)?;
    let slot = d.slot(&name)?;
    let tail = q.tail.unwrap_or(64 * 1024).min(16 << 20);
    let data = crate::console::read_tail(&slot.paths.console_log, tail).map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], data).into_response())
}

async fn console(
    State(d): AppState,
    Path(name): Path<String>,
    req: Request,
) -> HttpResult<Response> {
    let slot = d.slot(&name)?;
    crate::console::attach(&slot, req).await
}
