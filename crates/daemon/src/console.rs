//! The serial console through the daemon: an HTTP/1.1 upgrade to a raw byte stream joined
//! to the VMM's console socket, and the tail of the per-VM console log.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use api::{ApiError, ErrorCode};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::app::VmSlot;
use crate::error::{conflict, HttpResult};

/// The `Upgrade` protocol name of a console stream.
pub const PROTOCOL: &str = "ferrite-console";

/// Upgrade `req` to a console stream of `slot`'s VM.
pub async fn attach(slot: &VmSlot, mut req: Request) -> HttpResult<Response> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !wants_upgrade {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("The console is a stream: send Connection: Upgrade and Upgrade: {PROTOCOL}"),
        )
        .into());
    }
    if !slot.runtime().state.is_active() {
        return Err(conflict(format!("VM {:?} is not running: start it first", slot.name)).into());
    }
    let mut vm = UnixStream::connect(&slot.paths.console)
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::VmmUnavailable,
                format!("Cannot reach the VM's console socket: {e}"),
            )
        })?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = slot.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut vm).await;
            }
            Err(e) => tracing::warn!(vm = %name, "console upgrade failed: {e}"),
        }
    });
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .map_err(crate::error::internal)?;
    Ok(response)
}

/// The last `tail` bytes of the file at `path` (empty if it does not exist yet).
pub fn read_tail(path: &Path, tail: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(tail)))?;
    let mut out = Vec::new();
    file.take(tail).read_to_end(&mut out)?;
    Ok(out)
}
